"""fsa-distill: distil an LLM's fine-grained sentiment understanding into small seq2seq students."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

__version__ = "0.1.0"
