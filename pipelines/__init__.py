"""The shipped pipeline configs (package data): ``vqgen run demo`` finds ``demo.toml`` here."""
