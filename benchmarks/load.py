"""Load that checks itself: OpenAI clients sending greedy completions back to back while a fault is
made, each answer compared with an undisturbed run (test_chaos, test_netns)."""

from __future__ import annotations

import threading
import time

import openai

PROMPTS = ["Once upon a time", "The capital of France is", "def f(x): return", "1 2 3 4", "Hello, how are you"]


def client(base_url: str, timeout_s: float = 120) -> openai.OpenAI:
    """The official client, talking to `base_url` directly (no proxy from the environment: the servers
    under test are on loopback or on a bridge the test made)."""
    return openai.OpenAI(
        base_url=base_url,
        api_key="none",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(trust_env=False, timeout=timeout_s),
    )


def expected(model_dir: str, prompts: list[str]) -> list[tuple[str, str]]:
    """The in-process engine's greedy answers (16 tokens, float32), each with a stop string from its
    second half at which the streamed clients stop."""
    from cluster.build import local_engine
    from model.sampling import SamplingParams

    local = local_engine(model_dir, "float32")
    outs = local.generate(
        [local.tokenizer.encode(p) for p in prompts], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    )
    want = [(o.text, o.text[len(o.text) // 2 : len(o.text) // 2 + 3]) for o in outs]
    assert all(len(stop) == 3 and text.find(stop) > 0 for text, stop in want)
    return want


class Clients:
    """`n` client threads, each running `self.run(i)` until `self.stop` is set; the `with` block
    starts them, and its end stops them and waits up to JOIN_S for their requests in flight."""

    JOIN_S = 180

    def __init__(self, n: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]

    def run(self, i: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.JOIN_S)


class Stream(Clients):
    """`n` OpenAI clients sending greedy completions back to back, every other one streamed with a stop
    string; each answer is checked against the undisturbed run."""

    def __init__(self, base_url: str, model: str, prompts: list[str], want: list[tuple[str, str]], n: int):
        self.client = client(base_url)
        self.model = model
        self.prompts, self.want = prompts, want
        self.sent = self.completed = self.failed = self.identical = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        super().__init__(n)

    def run(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            p, k = k % len(self.prompts), k + 1
            with self.lock:
                self.sent += 1
            try:
                if i % 2:  # streamed, with a stop string: the text across a failover must be exact
                    text, stop = self.want[p]
                    chunks = self.client.completions.create(
                        model=self.model,
                        prompt=self.prompts[p],
                        max_tokens=16,
                        temperature=0,
                        stream=True,
                        stop=[stop],
                        extra_body={"ignore_eos": True},
                    )
                    got, ok = "".join(c.choices[0].text for c in chunks if c.choices), True
                    want = text[: text.find(stop)]
                else:
                    r = self.client.completions.create(
                        model=self.model,
                        prompt=self.prompts[p],
                        max_tokens=16,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                    got, want, ok = r.choices[0].text, self.want[p][0], r.usage.completion_tokens == 16
                with self.lock:
                    self.completed += 1
                    self.identical += got == want and ok
            except Exception as e:  # noqa: BLE001 - counted and reported
                with self.lock:
                    self.failed += 1
                    self.errors.append(f"{type(e).__name__}: {e}"[:300])

    def summary(self) -> str:
        with self.lock:
            return f"sent {self.sent}, completed {self.completed}, failed {self.failed}, identical {self.identical}"

    def completed_now(self) -> int:
        with self.lock:
            return self.completed


def progress(stream: Stream, n: int, timeout: float = 90) -> None:
    """Wait until `n` more requests have completed: the service is answering again."""
    start, deadline = stream.completed_now(), time.monotonic() + timeout
    while stream.completed_now() < start + n:
        assert time.monotonic() < deadline and not stream.errors, (
            f"no progress for {timeout} s; errors: {stream.errors[:3]}"
        )
        time.sleep(0.2)
