"""cineray: a distributed text-to-video rendering cluster on Ray."""

__version__ = "0.1.0"
