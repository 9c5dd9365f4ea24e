"""A real OpenAI-compatible upstream for the tests marked ``upstream`` (``tox -e upstream``).

Hugging Face's ``transformers serve`` (FastAPI and uvicorn, CPU only, on 127.0.0.1) runs on
tiny Llama models built here at test time, so nothing is downloaded:

- the tokenizer is a byte-level BPE trained on :data:`CORPUS` with a small vocabulary (as in
  issue 15, where the token estimate ran under the model's own count), and its chat template
  requires alternating roles, as Llama 2's, Mistral's and Gemma's do;
- each model is a randomly initialised one-layer Llama whose attention and MLP outputs are
  zeroed and whose embeddings and output layer are set so that the next token depends on the
  current one only: after the prompt's last token the *chat* model writes
  :data:`CHAT_REPLY` and stops (finish reason ``stop``), the *loop* model writes
  :data:`LOOP_TEXT` over and over until its token limit (finish reason ``length``). The
  server still runs the whole model (attention, RoPE, norms, sampling), only the answer is
  known in advance.

Building needs torch and transformers; it runs in a subprocess (``python -m tests.upstream
build DIR``) so that the test process never imports them. :class:`UpstreamServer` starts a
``transformers serve`` process and waits for uvicorn's "running on" line; :class:`Relay`
forwards TCP connections to it and tells when a client closed one, which is how a test sees
that cancelling a reply closed its connection to the upstream.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: What the chat model answers to anything.
CHAT_REPLY = "Hello, world!"
#: What the loop model repeats until its token limit.
LOOP_TEXT = " and on"

#: Text the tokenizer is trained on (and that tests write messages from).
CORPUS = (
    "Hello, world! How are you today? I am fine, thank you, and how are you? "
    "The quick brown fox jumps over the lazy dog. A chat server streams a reply token by "
    "token, keeps the history of each session and fits it into the context window of the "
    "model. Tell me a story about a server that never stopped answering questions. "
    "Why is the sky blue? Because the air scatters blue light more than red light. "
    "Be brief, and on and on it went, question after question, answer after answer. "
)

#: The chat template: Llama 2's shape, refusing any conversation whose roles do not
#: alternate user, assistant, ... after an optional system message (the check of Mistral's
#: and Llama 2's templates, with their error message).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}[INST]"
    "{% if loop.first and system %}<<SYS>>{{ system }}<</SYS>>{% endif %}"
    "{{ message['content'] }}[/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_SPECIAL = ["<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
_VOCABULARY = 400

#: The environment of every process here: no hub, no telemetry, no update check, one thread.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}

#: Longest wait for building the models or starting a server (importing torch included).
START_TIMEOUT = 120.0


@dataclass(frozen=True)
class Models:
    """Where the built models are; each path is also the model's name for the server."""

    chat: str
    loop: str
    #: A copy of the chat model that only the on-demand loading test asks for.
    lazy: str


def build_models(directory: Path) -> Models:
    """Build the tokenizer and the models under ``directory`` (in a subprocess)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.upstream", "build", str(directory)],
        cwd=Path(__file__).resolve().parents[1],
        env=_environment(directory),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            "building the test models failed (tox -e upstream installs torch and "
            f"transformers):\n{result.stdout}{result.stderr}"
        )
    return Models(
        chat=str(directory / "tiny-chat"),
        loop=str(directory / "tiny-loop"),
        lazy=str(directory / "tiny-lazy"),
    )


def _environment(home: Path) -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV, "HF_HOME": str(home / "hf-home")}


@dataclass
class UpstreamServer:
    """A ``transformers serve`` process on 127.0.0.1."""

    process: subprocess.Popen[str]
    port: int
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def start(cls, home: Path, *args: str) -> UpstreamServer:
        """Start ``transformers serve ARGS`` (``args`` may name a model to pin it to)."""
        executable = Path(sys.executable).with_name("transformers")
        command = [
            str(executable),
            "serve",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_environment(home),
        )
        assert process.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        output: list[str] = []
        reader = threading.Thread(
            target=_read_lines, args=(process.stdout, lines, output), daemon=True
        )
        reader.start()
        running = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                process.kill()
                process.wait(10)
                process.stdout.close()
                raise TimeoutError(f"transformers serve did not start: {''.join(output)}") from None
            if line is None:
                process.wait(START_TIMEOUT)
                reader.join(START_TIMEOUT)
                process.stdout.close()
                raise RuntimeError(
                    f"transformers serve exited with {process.returncode}: {''.join(output)}"
                )
            if found := running.search(line):
                return cls(process, int(found.group(1)), output, reader)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.reader is not None:
            # The pipe ends with the process; then it can be closed.
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _read_lines(stream: IO[str], lines: queue.Queue[str | None], output: list[str]) -> None:
    """Hand lines over until the server listens, then keep the pipe drained."""
    for line in stream:
        output.append(line)
        lines.put(line)
    lines.put(None)


class Relay:
    """Forwards TCP connections on 127.0.0.1 to ``port``; says when a client closed one.

    A client closing its side closes the connection to the upstream too, as a direct
    connection's close would (so the upstream sees its client leave).
    """

    def __init__(self, port: int) -> None:
        self._port = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        #: Set when a client closed a connection (the first time).
        self.client_closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        if from_client:
            self.client_closed.set()
        # Either side ending ends the connection both ways.
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # Shutting the listener down wakes the thread blocked in accept(); closing does not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for end in sockets:
            end.close()
        self._accepting.join(10)


@dataclass(frozen=True)
class Upstream:
    """The models, and two servers: one loading models on demand, one pinned to the chat model."""

    models: Models
    server: UpstreamServer
    pinned: UpstreamServer


@contextlib.contextmanager
def running_upstream(home: Path) -> Iterator[Upstream]:
    """Build the models under ``home``, start both servers (in parallel), stop them after."""
    models = build_models(home)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starts = [
            pool.submit(UpstreamServer.start, home),
            pool.submit(UpstreamServer.start, home, models.chat),
        ]
        concurrent.futures.wait(starts)
    started = [start.result() for start in starts if start.exception() is None]
    failed = [error for start in starts if (error := start.exception()) is not None]
    if failed:
        for server in started:
            server.stop()
        raise failed[0]
    server, pinned = started
    try:
        yield Upstream(models, server, pinned)
    finally:
        server.stop()
        pinned.stop()


# -- building (in the subprocess) ----------------------------------------------------------------


def _build(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCABULARY,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([CORPUS] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=_SPECIAL[2:],
        chat_template=CHAT_TEMPLATE,
    )
    end = tokenizer.convert_tokens_to_ids("[/INST]")
    chat = _tokens(tokenizer, CHAT_REPLY)
    loop = _tokens(tokenizer, LOOP_TEXT)
    chat_next = dict(zip([end, *chat], [*chat, tokenizer.eos_token_id], strict=True))
    loop_next = dict(zip([end, *loop], [*loop, loop[0]], strict=True))
    for name, following in (("tiny-chat", chat_next), ("tiny-loop", loop_next)):
        _save_model(directory / name, tokenizer, following)
        tokenizer.save_pretrained(directory / name)
    shutil.copytree(directory / "tiny-chat", directory / "tiny-lazy")


def _tokens(tokenizer: Any, text: str) -> list[int]:
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    # A token that came twice would send the next-token chain round in a circle.
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{text!r} tokenizes with a repeated token: {ids}")
    return ids


def _save_model(path: Path, tokenizer: Any, following: dict[int, int]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vocabulary = len(tokenizer)
    # One dimension per token, so that every token's embedding is orthogonal to the others.
    hidden = -(-vocabulary // 16) * 16
    config = LlamaConfig(
        vocab_size=vocabulary,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            # The residual stream then carries the current token's embedding unchanged.
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # Embeddings of RMS 1 (the final norm leaves them as they are): scaled unit vectors.
        model.model.embed_tokens.weight.copy_(torch.eye(vocabulary, hidden) * hidden**0.5)
        head = torch.zeros(vocabulary, hidden)
        for token in range(vocabulary):
            head[following.get(token, tokenizer.eos_token_id), token] = 1.0
        model.lm_head.weight.copy_(head)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "build":
        raise SystemExit("usage: python -m tests.upstream build DIRECTORY")
    _build(Path(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
