"""The noise key and counter: a 128-bit secret plus a monotone step counter.

Secure mode (the default) draws the key from the OS (os.urandom(16)), refuses user seeds, never
prints it (repr shows a hidden key), refuses to be pickled, and leaves it out of state_dict(): a
checkpoint holds the step and a one-way fingerprint only, so a resumed run keeps numbering steps
from where it stopped, under a fresh key unless it is the same live generator. Deterministic mode
(seed=...) derives the key from the seed with SHA-256 and is for tests and reproducible runs only.

Every noisy release consumes one step (`next_step()`); (key, step, stream, element) is never reused
because steps only move forward: load_state_dict refuses a step behind the current one for the same
key.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading

from dpkern.noise.reference import MAX_STEP, STREAM_GAUSSIAN, key_words, step_words

_DOMAIN = b"dpkern/noise/v1"


def _as_int32(x: int) -> int:
    """uint32 -> the same 32 bits as a signed int (kernels take int32 arguments)."""
    return x - (1 << 32) if x >= (1 << 31) else x


class NoiseGenerator:
    """Key + counter for the counter-based Gaussian noise.

    Args:
        secure: True (default): key from os.urandom(16); `seed` must be None.
        seed: deterministic mode only (secure=False): a non-negative int.
    Example:
        >>> gen = NoiseGenerator()                         # production
        >>> gen = NoiseGenerator(secure=False, seed=1234)  # tests
        >>> step = gen.next_step()                         # 0, then 1, ...
    """

    def __init__(self, *, secure: bool = True, seed: int | None = None):
        if secure:
            if seed is not None:
                raise ValueError("NoiseGenerator: secure mode draws its key from the OS and refuses "
                                 "a user seed; pass secure=False for a deterministic (test) generator")
            key = os.urandom(16)
        else:
            if seed is None or not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError("NoiseGenerator: deterministic mode (secure=False) needs seed=<int >= 0>")
            key = hashlib.sha256(_DOMAIN + b"/seed/" + str(seed).encode()).digest()[:16]
        self._key = key
        self._secure = bool(secure)
        self._step = 0
        self._lock = threading.Lock()

    def adopt_key(self, key: bytes) -> None:
        """Take another generator's 16-byte key (data-parallel ranks share rank 0's key, sent over
        the process group). Only before the first release: a generator that has numbered steps
        under one key must not continue under another (its checkpoint fingerprint would lie)."""
        if not isinstance(key, (bytes, bytearray)) or len(key) != 16:
            raise ValueError("adopt_key: the key must be 16 bytes")
        with self._lock:
            if self._step != 0:
                raise RuntimeError(f"adopt_key: this generator already released {self._step} "
                                   "step(s) under its own key; adopt the shared key before step 0")
            self._key = bytes(key)

    # --- counter -------------------------------------------------------------------------------
    @property
    def secure(self) -> bool:
        return self._secure

    @property
    def step(self) -> int:
        """The step the next release will use."""
        return self._step

    def next_step(self) -> int:
        """Reserve one counter step (thread-safe) and return it."""
        with self._lock:
            s = self._step
            if s >= MAX_STEP:
                raise RuntimeError("NoiseGenerator: counter exhausted (2**56 steps)")
            self._step = s + 1
            return s

    def kernel_words(self, step: int, stream: int = STREAM_GAUSSIAN) -> dict:
        """Kernel arguments for `step`: Philox key k0, k1 and whitened counter words c2, c3, as int32."""
        s0, s1, s2, s3 = key_words(self._key)
        lo, hi = step_words(step, stream)
        return {"k0": _as_int32(s0), "k1": _as_int32(s1),
                "c2": _as_int32(lo ^ s2), "c3": _as_int32(hi ^ s3)}

    @property
    def fingerprint(self) -> str:
        """A one-way tag of the key (HMAC-SHA256 under a fixed domain), to recognise the same key."""
        return hmac.new(self._key, _DOMAIN + b"/fingerprint", hashlib.sha256).hexdigest()[:32]

    # --- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{'step', 'secure', 'fingerprint'} and, in deterministic mode only, 'key' (16 bytes)."""
        state = {"step": self._step, "secure": self._secure, "fingerprint": self.fingerprint}
        if not self._secure:
            state["key"] = self._key
        return state

    def check_state(self, state: dict) -> None:
        """Raises what load_state_dict(state) would refuse, changing nothing."""
        for k in ("step", "secure", "fingerprint"):
            if k not in state:
                raise KeyError(f"NoiseGenerator.load_state_dict: state has no {k!r}")
        step = state["step"]
        if not isinstance(step, int) or not 0 <= step < MAX_STEP:
            raise ValueError(f"NoiseGenerator.load_state_dict: bad step {step!r}")
        if bool(state["secure"]) != self._secure:
            raise ValueError("NoiseGenerator.load_state_dict: the state was saved in "
                             f"{'secure' if state['secure'] else 'deterministic'} mode, this generator "
                             f"is {'secure' if self._secure else 'deterministic'}")
        if self._secure:
            same_key = hmac.compare_digest(str(state["fingerprint"]), self.fingerprint)
        else:
            key = state.get("key")
            if not isinstance(key, (bytes, bytearray)) or len(key) != 16:
                raise ValueError("NoiseGenerator.load_state_dict: deterministic state needs a "
                                 "16-byte 'key'")
            same_key = hmac.compare_digest(bytes(key), self._key)
        if same_key and step < self._step:
            raise ValueError(f"NoiseGenerator.load_state_dict: step {step} is behind the current "
                             f"step {self._step} for the same key; loading it would replay noise")

    def load_state_dict(self, state: dict) -> None:
        """Resume the counter. Refuses a step behind the current one for the same key (replay).

        Secure generators never take a key from a checkpoint: same fingerprint -> same live key,
        else this generator keeps its own fresh key and continues at the stored step.
        """
        self.check_state(state)
        step = state["step"]
        if self._secure:
            same_key = hmac.compare_digest(str(state["fingerprint"]), self.fingerprint)
            self._step = max(step, self._step) if same_key else step
            return
        self._key, self._step = bytes(state["key"]), step

    # --- never leak the key --------------------------------------------------------------------
    def __repr__(self) -> str:
        mode = "secure" if self._secure else "deterministic"
        return f"NoiseGenerator(mode={mode}, step={self._step}, key=<hidden>)"

    __str__ = __repr__

    def __getstate__(self):
        if self._secure:
            raise TypeError("NoiseGenerator: a secure generator cannot be pickled (it would write "
                            "the key); checkpoint it with state_dict()")
        return {"key": self._key, "secure": False, "step": self._step}

    def __setstate__(self, st):
        self._key, self._secure, self._step = st["key"], st["secure"], st["step"]
        self._lock = threading.Lock()
