"""Private keys: encrypted at rest, unlocked in memory at start-up, handed to tools by pipe."""

from .handoff import ToolSecrets
from .passphrases import PassphraseSource
from .store import KeySpec, UnlockedKey, load_key

__all__ = ["KeySpec", "PassphraseSource", "ToolSecrets", "UnlockedKey", "load_key"]
