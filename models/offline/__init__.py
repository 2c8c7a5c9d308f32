"""The offline engine: PocketSphinx speech recognition -> a small responder -> eSpeak NG.

Runs on any CPU with nothing to download: the recognizer's English model ships in the
`pocketsphinx` wheel and the synthesizer's library in `espeakng-loader` (or the system's
libespeak-ng). See `models.offline.engine.OfflineEngine`.
"""

from models.offline.asr import SpeechRecognizer
from models.offline.engine import OfflineEngine
from models.offline.responder import Responder
from models.offline.tts import SpeechSynthesizer

__all__ = ["OfflineEngine", "Responder", "SpeechRecognizer", "SpeechSynthesizer"]
