"""The emulator's long-lived parts in one place: config (file + runtime overlay), state, keys,
clock, faults and the JWKS resolver. Operation modules receive this object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metering_operator.emulator.clock import SettableClock
from metering_operator.emulator.config import OVERLAY_KEYS, EmulatorConfig, load_config
from metering_operator.emulator.faults import Faults
from metering_operator.emulator.keys import KeyStore
from metering_operator.emulator.state import State
from metering_operator.emulator.sts import JwksResolver

_OVERLAY_KEY = "config_overlay"


class EmulatorContext:
    def __init__(self, config_path: Path | None, state_dir: Path) -> None:
        self.config_path = config_path
        self.state_dir = state_dir
        self.state = State(state_dir)
        self.keys = KeyStore(state_dir / "keys")
        self.clock = SettableClock(self.state)
        self.resolver = JwksResolver()
        self.file_config = load_config(config_path)
        self.config = self.file_config.merged(self.overlay())
        self.faults = Faults(self.state, self.config.faults)
        self._export_keys()

    def overlay(self) -> dict[str, list[dict[str, Any]]]:
        return dict(self.state.get_kv(_OVERLAY_KEY, {}))

    def reload(self) -> EmulatorConfig:
        """Re-read the config file; runtime additions stay on top. Raises ConfigError if invalid."""
        fresh = load_config(self.config_path)
        self.file_config = fresh
        self.config = fresh.merged(self.overlay())
        self.faults.set_config(self.config.faults)
        self._export_keys()
        return self.config

    def put(self, section: str, entry: dict[str, Any]) -> EmulatorConfig:
        """Add or replace one runtime entry (validated together with the whole config)."""
        key = OVERLAY_KEYS[section]
        overlay = self.overlay()
        entries = [e for e in overlay.get(section, []) if e.get(key) != entry.get(key)] + [entry]
        candidate = {**overlay, section: entries}
        merged = self.file_config.merged(candidate)  # raises pydantic ValidationError when invalid
        self.state.set_kv(_OVERLAY_KEY, candidate)
        self.config = merged
        self._export_keys()
        return merged

    def _export_keys(self) -> None:
        # Generate key pairs up front so the public PEM files exist for sellers to configure.
        for product in self.config.products:
            for version in product.public_key_versions:
                self.keys.private_key(product.product_code, version.version)
        for fingerprint in {lic.issuer.key_fingerprint for lic in self.config.licenses}:
            self.keys.issuer_private_key(fingerprint)
