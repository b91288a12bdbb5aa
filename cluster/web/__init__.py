"""The web playground (index.html, app.js, style.css): static files the ingress serves at `/`."""
