"""Provenance stages: the invisible watermark and the signed C2PA manifest of every output.

    watermark(frames, payload) -> frames       # uint8 (T, H, W, 3), before muxing
    detect(frames) -> Detection                # payload, score, calibrated decision
    sign_mp4(data, manifest_info) -> bytes     # embeds a signed C2PA manifest
    read_manifest(data) -> ManifestReport      # the manifest and its validation state
    package(frames, fps, payload, info) -> bytes   # watermark -> mux -> sign: every output path

Payload: 48 bits = 16-bit model id (from a digest of the weights) + 32-bit job id hash, packed
with a CRC-16 into the watermark's 64 bits; the watermark model (cineray.models.watermark) adds
the error-correcting code. The CRC tells a payload read right from one the code could not
correct: a weak watermark can still be detected (its pilot) while its payload is unreadable.

Signing: a cluster configures its own certificate chain and key (SigningConfig, or the
CINERAY_C2PA_CERT / CINERAY_C2PA_KEY environment variables naming PEM files). Otherwise a local
CA and an ES256 signing certificate are created on first use under `<data folder>/provenance/`
(private keys mode 0600). A reader that does not trust that CA sees the manifest as "Valid"
(signature and hashes check, issuer unknown); with the local CA as anchor it is "Trusted".
No time-stamp authority and no network are used.

Configuration: the `provenance` section of CinerayConfig (ProvenanceConfig) holds the watermark
key and the signing material; every function here takes it as an optional `cfg` and, left out or
with fields left None, falls back to the environment (CINERAY_WATERMARK_KEY, CINERAY_C2PA_*) and
then to the public defaults.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from cineray import __version__
from cineray.models.watermark import WATERMARK_PRESETS, Reading, Watermark, WatermarkConfig
from cineray.video import read_mp4

MODEL_BITS, JOB_BITS, CRC_BITS = 16, 32, 16
PACKED_BITS = MODEL_BITS + JOB_BITS + CRC_BITS
DEFAULT_WATERMARK_KEY = WatermarkConfig.key  # public: a deployment sets its own secret key
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.cineray.generation"
# Detector thresholds on Reading.score, from 1,000 unwatermarked 64x64x33 world clips (H.264
# CRF 23; benchmarks/bench_watermark.py), the better of the default and short watermarks' reads
# (detect() tries both): aligned read mean 7.52, std 0.50, max 9.18; crop/scale/re-time search
# (the best of many registrations, hence higher) mean 9.00, std 0.30, max 10.07.
# A payload that passes its CRC is evidence on its own (noise passes 1 time in 65,536), so it
# needs a lower score (about mean + 1.7 std); an unreadable one needs mean + 5 std.
THRESHOLDS = {  # (search?, payload readable?) -> score needed
    (False, True): 8.4, (False, False): 10.2,
    (True, True): 9.5, (True, False): 10.6,
}


# ---------------------------------------------------------------------------------------------
# Payload
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """What the watermark carries: model id (16 bits) and job id hash (32 bits)."""

    model: int
    job: int

    def __post_init__(self):
        if not (0 <= self.model < 2**MODEL_BITS and 0 <= self.job < 2**JOB_BITS):
            raise ValueError(f"payload fields out of range: model {self.model} (16 bits), "
                             f"job {self.job} (32 bits)")

    @classmethod
    def for_job(cls, model_id: str, job_id: str) -> Payload:
        return cls(_hash_bits(model_id, MODEL_BITS), _hash_bits(job_id, JOB_BITS))

    def bits(self) -> np.ndarray:
        """(64,) uint8, most significant bit first: model, job, then the CRC-16 of both."""
        value = (self.model << JOB_BITS) | self.job
        value = (value << CRC_BITS) | crc16(value.to_bytes(6, "big"))
        return np.array([(value >> i) & 1 for i in range(PACKED_BITS - 1, -1, -1)], np.uint8)

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> Payload | None:
        """The payload of 64 read bits, or None when their CRC does not match."""
        if len(bits) != PACKED_BITS:
            raise ValueError(f"expected {PACKED_BITS} bits, got {len(bits)}")
        value = int("".join(str(int(b)) for b in bits), 2)
        data, crc = value >> CRC_BITS, value & (2**CRC_BITS - 1)
        if crc16(data.to_bytes(6, "big")) != crc:
            return None
        return cls(data >> JOB_BITS, data & (2**JOB_BITS - 1))

    def __str__(self) -> str:
        return f"{self.model:04x}-{self.job:08x}"


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def _hash_bits(text: str, bits: int) -> int:
    if not isinstance(text, str) or not text:
        raise ValueError(f"ids must be non-empty strings, got {text!r}")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - bits)


def model_id(modules: dict) -> str:
    """A content id for a set of named torch modules: digest of their configs and weights, so
    two processes with the same weights agree and any retrained weights differ."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(modules):
        module = modules[name]
        h.update(name.encode() + repr(getattr(module, "cfg", "")).encode())
        for key, tensor in sorted(module.state_dict().items()):
            h.update(key.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"cineray-{h.hexdigest()}"


# ---------------------------------------------------------------------------------------------
# Watermark stages
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def watermarkers(key: int = DEFAULT_WATERMARK_KEY) -> tuple[Watermark, Watermark]:
    """(default, short) watermarks under one key (models/watermark.py WATERMARK_PRESETS)."""
    return tuple(Watermark(replace(WATERMARK_PRESETS[name], key=key))
                 for name in ("default", "short"))


def watermark(frames: np.ndarray, payload: Payload,
              cfg: ProvenanceConfig | None = None) -> np.ndarray:
    """Embed `payload` in a clip: uint8 (T, H, W, 3) -> uint8 (T, H, W, 3), with cfg's key;
    the default watermark for clips of at least its segment count, the short one below."""
    default, short = watermarkers(_config(cfg).key())
    wm = default if len(frames) >= default.cfg.segments else short
    return wm.embed(frames, payload.bits())


@dataclass
class Detection:
    """detect's answer. payload is None when no watermark is found, or when one is found but
    its payload fails the CRC (too damaged to read)."""

    watermarked: bool
    payload: Payload | None
    score: float  # z-score of the expected pattern; about 7 +- 0.7 on unwatermarked clips
    threshold: float  # the score a watermark needs (depends on whether it was re-registered)
    confidence: float  # fraction of coded bits agreeing with the decoded codeword (~0.74 chance)
    registration: tuple = ()  # () = as embedded; else (cell h px, cell w px, shift y, shift x)
    bits: np.ndarray | None = field(default=None, repr=False)  # the 64 decoded bits

    def to_dict(self) -> dict:
        out = asdict(self)
        out["payload"] = None if self.payload is None else str(self.payload)
        out["payload_readable"] = self.payload is not None
        out.pop("bits")
        return out


def detect(frames: np.ndarray, search: bool = True,
           cfg: ProvenanceConfig | None = None) -> Detection:
    """Read the watermark of a clip uint8 (T, H, W, 3): first as embedded (any size: a resized
    copy maps to the same cells); if that fails and `search`, re-register a cropped or rescaled
    copy (crop, rescale) and re-time a clip that lost frames. Only a clip marked with cfg's
    watermark key is found."""
    marks = watermarkers(_config(cfg).key())  # a clip that lost frames may have been long
    found = _best([decide(wm.read(frames), searched=False) for wm in marks])
    if found.payload is not None or not search:
        return found
    return _best([found, *(decide(wm.search(frames), searched=True) for wm in marks)])


def _best(found: list[Detection]) -> Detection:
    """A readable payload first, then a detection, then the higher score."""
    return max(found, key=lambda d: (d.payload is not None, d.watermarked, d.score))


def detect_mp4(data: bytes | str, cfg: ProvenanceConfig | None = None) -> Detection:
    frames, _ = read_mp4(data)
    return detect(frames, cfg=cfg)


def decide(reading: Reading, searched: bool) -> Detection:
    """The calibrated decision on one read (see THRESHOLDS)."""
    payload = Payload.from_bits(reading.bits)
    threshold = THRESHOLDS[searched, payload is not None]
    ok = reading.score >= threshold
    return Detection(ok, payload if ok else None, reading.score, threshold, reading.agreement,
                     reading.registration, reading.bits)


# ---------------------------------------------------------------------------------------------
# C2PA
# ---------------------------------------------------------------------------------------------


@dataclass
class ManifestInfo:
    """What the manifest states about a generated clip."""

    model_id: str
    prompt: str  # only its SHA-256 goes into the manifest
    job_id: str
    payload: Payload
    model_version: str = __version__
    title: str = "cineray.mp4"

    def manifest(self) -> dict:
        agent = {"name": "cineray", "version": self.model_version}
        created = {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                   "softwareAgent": agent,
                   "parameters": {"model_id": self.model_id, "model_version": self.model_version}}
        generation = {"model_id": self.model_id, "model_version": self.model_version,
                      "prompt_sha256": hashlib.sha256(self.prompt.encode()).hexdigest(),
                      "job_id": self.job_id, "watermark_payload": str(self.payload)}
        return {"claim_generator_info": [agent], "title": self.title, "format": "video/mp4",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [created]}},
                               {"label": GENERATION_LABEL, "data": generation}]}


@dataclass
class SigningConfig:
    """A cluster's own certificate chain (leaf first) and private key, as PEM file paths; left
    empty, a local CA under `keys_dir` (created on first use) issues the signing certificate."""

    cert_chain: str | None = None
    private_key: str | None = None
    keys_dir: str = os.path.join("cineray-data", "provenance")
    algorithm: str = "es256"

    @classmethod
    def from_env(cls) -> SigningConfig:
        """CINERAY_C2PA_CERT + CINERAY_C2PA_KEY (PEM paths), or CINERAY_C2PA_DIR for the local
        CA's folder; unset: the local CA under cineray-data/provenance/."""
        env = os.environ
        return cls(env.get("CINERAY_C2PA_CERT") or None, env.get("CINERAY_C2PA_KEY") or None,
                   env.get("CINERAY_C2PA_DIR") or cls.keys_dir)


@dataclass
class ProvenanceConfig:
    """The `provenance` config section: watermark key and C2PA signing material.

    watermark_key seeds the watermark's keyed carriers: only the same key embeds and detects.
    The default (None) is CINERAY_WATERMARK_KEY when set, else the PUBLIC default
    DEFAULT_WATERMARK_KEY, which anyone can read and forge with. A deployment sets its own
    secret (a non-negative integer, e.g. `python -c "import secrets; print(secrets.randbits(
    64))"`) through the environment or `provenance.watermark_key=...`, and keeps it: clips
    marked under one key are not detected under another.
    Signing fields left None come from CINERAY_C2PA_CERT / CINERAY_C2PA_KEY / CINERAY_C2PA_DIR,
    else the local CA under cineray-data/provenance/ (see SigningConfig)."""

    watermark_key: int | None = None
    cert_chain: str | None = None  # PEM chain, leaf first
    private_key: str | None = None  # PEM private key of the leaf
    keys_dir: str | None = None  # the local CA's folder when no chain is given

    def __post_init__(self):
        if self.watermark_key is not None and self.watermark_key < 0:
            raise ValueError(f"provenance.watermark_key must be a non-negative integer, got "
                             f"{self.watermark_key}")
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("give both provenance.cert_chain and provenance.private_key, or "
                             "neither to use the local CA")

    def key(self) -> int:
        """The watermark key in force: the field, else CINERAY_WATERMARK_KEY, else the default."""
        if self.watermark_key is not None:
            return self.watermark_key
        text = os.environ.get("CINERAY_WATERMARK_KEY", "").strip()
        if not text:
            return DEFAULT_WATERMARK_KEY
        try:
            value = int(text, 0)  # decimal, or 0x... hex
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"CINERAY_WATERMARK_KEY={text!r} is not a non-negative integer; set "
                             f"it to e.g. a decimal or 0x-prefixed hex number")
        return value

    def signing(self) -> SigningConfig:
        """SigningConfig with the fields left None taken from the environment."""
        env = SigningConfig.from_env()
        if self.cert_chain is not None:
            env.cert_chain, env.private_key = self.cert_chain, self.private_key
        if self.keys_dir is not None:
            env.keys_dir = self.keys_dir
        return env


def _config(cfg: ProvenanceConfig | None) -> ProvenanceConfig:
    return cfg if cfg is not None else ProvenanceConfig()


def _signing(cfg: ProvenanceConfig | SigningConfig | None) -> SigningConfig | None:
    """The signing half of either config (None: the environment, as before)."""
    return cfg.signing() if isinstance(cfg, ProvenanceConfig) else cfg


def signing_material(cfg: SigningConfig | None = None) -> tuple[bytes, bytes, bytes | None]:
    """(certificate chain PEM, private key PEM, local CA PEM or None for a configured chain)."""
    cfg = cfg or SigningConfig.from_env()
    if bool(cfg.cert_chain) != bool(cfg.private_key):
        raise ValueError("give both cert_chain and private_key (CINERAY_C2PA_CERT and "
                         "CINERAY_C2PA_KEY), or neither to use the local CA")
    if cfg.cert_chain:
        return Path(cfg.cert_chain).read_bytes(), Path(cfg.private_key).read_bytes(), None
    folder = Path(cfg.keys_dir)
    if not (folder / "signer.pem").is_file():
        _create_local_ca(folder)
    chain = (folder / "signer.pem").read_bytes() + (folder / "ca.pem").read_bytes()
    return chain, (folder / "signer.key").read_bytes(), (folder / "ca.pem").read_bytes()


def _create_local_ca(folder: Path) -> None:
    """Write ca.pem/ca.key and signer.pem/signer.key (ES256, keys 0600) into `folder`
    atomically: built in a temp folder beside it and renamed, so concurrent first uses agree."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    folder.parent.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("cineray local CA", ca_key, ca_key, None, days=3650)
    leaf = _certificate("cineray signer", key, ca_key, ca, days=825)
    tmp = Path(tempfile.mkdtemp(prefix=".provenance-", dir=folder.parent))  # mode 0700
    try:
        for name, obj in (("ca", (ca, ca_key)), ("signer", (leaf, key))):
            (tmp / f"{name}.pem").write_bytes(obj[0].public_bytes(serialization.Encoding.PEM))
            fd = os.open(tmp / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(obj[1].private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        os.rename(tmp, folder)  # fails if another process got there first: use theirs
    except OSError:
        if not (folder / "signer.pem").is_file():
            raise
    finally:
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()


def _certificate(name: str, key, issuer_key, issuer_cert, days: int):
    """A CA certificate (issuer_cert None) or a leaf with the usages C2PA asks of a signer."""
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cineray local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    is_ca = issuer_cert is None
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "encipher_only", "decipher_only"), False)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(subject if is_ca else issuer_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
         .add_extension(x509.KeyUsage(digital_signature=not is_ca, key_cert_sign=is_ca,
                                      crl_sign=is_ca, **usage), True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False))
    if not is_ca:
        b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 issuer_key.public_key()), False))
    return b.sign(issuer_key, hashes.SHA256())


def sign_mp4(data: bytes, info: ManifestInfo, cfg: SigningConfig | None = None) -> bytes:
    """Embed a signed C2PA manifest (c2pa.created, trainedAlgorithmicMedia, model id and
    version, prompt hash, job id, watermark payload) into MP4 bytes; returns the new bytes."""
    import c2pa  # noqa: PLC0415

    chain, key, _ = signing_material(cfg)
    algorithm = (cfg or SigningConfig()).algorithm
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(algorithm.encode(), chain, key, None))
    out = io.BytesIO()
    with c2pa.Builder(info.manifest()) as builder, signer:
        builder.sign(signer, "video/mp4", io.BytesIO(data), out)
    return out.getvalue()


@dataclass
class ManifestReport:
    """read_manifest's answer. state: "Invalid" | "Valid" | "Trusted" (c2pa's validation
    states), or "absent" when the file carries no manifest."""

    state: str
    manifest: dict | None = None  # the active manifest
    failures: list[str] = field(default_factory=list)  # failure codes, e.g. signingCredential.untrusted
    trusted_state: str | None = None  # with the local CA as trust anchor (when one exists here)

    @property
    def valid_apart_from_trust(self) -> bool:
        """Signature and hashes check; at most the issuer is unknown to the reader."""
        return self.state in ("Valid", "Trusted") and all(
            f == "signingCredential.untrusted" for f in self.failures)


def read_manifest(data: bytes, cfg: SigningConfig | None = None) -> ManifestReport:
    """Read and validate the C2PA manifest of MP4 bytes, as a reader without our CA would, and
    again with the local CA as trust anchor when this machine holds one."""
    import c2pa  # noqa: PLC0415

    state, manifest, failures = _read(c2pa, data, None)
    if state == "absent":
        return ManifestReport("absent")
    cfg = cfg or SigningConfig.from_env()
    ca = Path(cfg.keys_dir) / "ca.pem"
    trusted = None
    if not cfg.cert_chain and ca.is_file():
        ctx = c2pa.Context.from_dict({"trust": {"user_anchors": ca.read_text()},
                                      "verify": {"verify_trust": True}})
        trusted = _read(c2pa, data, ctx)[0]
    return ManifestReport(state, manifest, failures, trusted)


def _read(c2pa, data: bytes, context) -> tuple[str, dict | None, list[str]]:
    kwargs = {"context": context} if context is not None else {}
    try:
        reader = c2pa.Reader("video/mp4", io.BytesIO(data), **kwargs)
    except c2pa.C2paError.ManifestNotFound:
        return "absent", None, []
    with reader:
        results = reader.get_validation_results() or {}
        failures = [f["code"] for f in results.get("activeManifest", {}).get("failure", [])]
        return reader.get_validation_state() or "Invalid", reader.get_active_manifest(), failures


# ---------------------------------------------------------------------------------------------
# One output
# ---------------------------------------------------------------------------------------------


def package(frames: np.ndarray, fps: float, info: ManifestInfo,
            cfg: ProvenanceConfig | SigningConfig | None = None,
            timings: dict[str, float] | None = None) -> bytes:
    """The end of every output path: watermark info.payload into uint8 (T, H, W, 3) frames, mux
    them to an H.264 MP4 and sign its manifest. No request field reaches this switch-free path.
    cfg: the provenance section (watermark key + signing), or just a SigningConfig (default
    watermark key); None: environment, then defaults.
    timings: seconds per step ("watermark", "mux", "sign") are added to it."""
    from cineray.pipelines.stages import mux  # noqa: PLC0415  (loads the models: keep lazy)

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    marked = watermark(frames, info.payload, cfg if isinstance(cfg, ProvenanceConfig) else None)
    t1 = time.perf_counter()
    data = mux(marked, fps)
    t2 = time.perf_counter()
    signed = sign_mp4(data, info, _signing(cfg))
    timings.update(watermark=t1 - t0, mux=t2 - t1, sign=time.perf_counter() - t2)
    return signed


def describe(data: bytes, cfg: ProvenanceConfig | None = None) -> dict:
    """What `cineray verify` prints: the watermark reading (with cfg's key), the manifest report,
    and whether the watermark payload matches the ids the manifest states."""
    det = detect_mp4(data, cfg)
    report = read_manifest(data, _signing(cfg))
    generation = _assertion(report.manifest, GENERATION_LABEL) or {}
    match = None
    if det.payload is not None and generation.get("model_id") and generation.get("job_id"):
        match = det.payload == Payload.for_job(generation["model_id"], generation["job_id"])
    return {"watermark": det.to_dict(),
            "c2pa": {"state": report.state, "trusted_with_local_ca": report.trusted_state,
                     "valid_apart_from_trust": report.valid_apart_from_trust,
                     "failures": report.failures, "manifest": report.manifest},
            "payload_matches_manifest": match}


def _assertion(manifest: dict | None, label: str) -> dict | None:
    for a in (manifest or {}).get("assertions", []):
        if a.get("label") == label:
            return a.get("data")
    return None


__all__ = ["Payload", "Detection", "ManifestInfo", "ManifestReport", "SigningConfig",
           "ProvenanceConfig", "DEFAULT_WATERMARK_KEY",
           "watermark", "detect", "detect_mp4", "decide", "sign_mp4", "read_manifest", "package",
           "model_id", "describe"]
