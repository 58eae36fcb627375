"""A local, in-memory emulator of the self-hosted Work API (Anthropic and Qoder flavours at once)."""

from ._server import Emulator, EmulatorThread, main
from ._settings import EmulatorSettings

__all__ = ["Emulator", "EmulatorSettings", "EmulatorThread", "main"]
