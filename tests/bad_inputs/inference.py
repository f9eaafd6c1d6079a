"""Bad arguments to generation and to ``model.apply``: rows of the bad-input table.

Every row fails before anything is compiled: prompts, sampling settings and lengths are checked
in Python (llmjax/inference/validate.py), shapes and dtypes of ``model.apply``'s inputs at trace
time, and ``llmjax generate`` checks its flags before it loads a model where it can.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

import llmjax
from llmjax.errors import InputError
from llmjax.inference import (
    SamplingConfig,
    best_of_n,
    cot_decode,
    generate,
    quantize,
    self_consistency,
    speculative_generate,
)
from tests.bad_inputs import Api, Cli, Env

X = np.ones((2, 5), np.int32)  # a valid [batch, length] for model.apply


def bad(name: str, call, expect: str) -> Api:
    """A Python call that must raise ``InputError`` with ``expect`` in its message."""
    return Api(name, call, InputError, expect)


def _gen(env: Env, prompts=((1, 2),), **kw):
    kw = {"max_new_tokens": 2, **kw}
    return generate(env.model, env.params, [list(p) for p in prompts], **kw)


def _raw(env: Env, prompts, **kw):
    """``generate`` with ``prompts`` passed exactly as given."""
    return generate(env.model, env.params, prompts, **{"max_new_tokens": 2, **kw})


def _spec(env: Env, prompts=((1, 2),), draft=None, **kw):
    draft = draft or env.model
    kw = {"max_new_tokens": 2, **kw}
    return speculative_generate(env.model, env.params, draft, env.params, prompts, **kw)


def _apply(env: Env, tokens=X, jit=False, **kw):
    apply = jax.jit(env.model.apply) if jit else env.model.apply
    return apply(env.params, tokens, **kw)


def _cache(env: Env, **fields):
    """A cache for ``X`` with some fields replaced by arrays of the wrong shape."""
    return env.model.init_cache(*X.shape[:1], 8).replace(**fields)


def _zeros_hf(env: Env, name: str, tokenizer: bool = False, **overrides) -> Path:
    """A llama3-tiny HF directory with zero weights and ``overrides`` (no init, no compile)."""
    model = llmjax.build("llama3-tiny", **overrides)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.abstract_params())
    path = env.tmp / name
    llmjax.to_hf(model, params, path)
    if tokenizer:
        (path / "tokenizer.model").write_bytes((env.hf / "tokenizer.model").read_bytes())
    return path


def _no_tokenizer(env: Env) -> str:
    d = env.copy(env.hf, "hf")
    (d / "tokenizer.model").unlink()
    return str(d)


def _hf(env: Env, *extra: str, path=None) -> list[str]:
    base = ["generate", "--hf", str(path or env.hf), "--prompt-ids", "2,5,9"]
    return [*base, "--max-new-tokens", "2", *extra]


def _with_ids(env: Env, ids: str, *extra: str) -> list[str]:
    return ["generate", "--hf", str(env.hf), "--prompt-ids", ids, *extra]


GENERATE = [
    bad(
        "generate: prompt id beyond int32",
        lambda e: _gen(e, [[1, 2**32 + 1]]),
        "prompts[0][1]=4294967297: is outside the vocabulary [0, 512)",
    ),
    bad(
        "generate: prompt id beyond the vocabulary",
        lambda e: _gen(e, [[1], [1, 512]]),
        "prompts[1][1]=512: is outside the vocabulary [0, 512)",
    ),
    bad("generate: negative prompt id", lambda e: _gen(e, [[-1]]), "prompts[0][0]=-1"),
    bad(
        "generate: float inside a prompt",
        lambda e: _gen(e, [[1, 3.5]]),
        "prompts[0][1]=3.5: is a float; token ids must be ints",
    ),
    bad("generate: bool inside a prompt", lambda e: _gen(e, [[True, 2]]), "is a bool"),
    bad("generate: None inside a prompt", lambda e: _gen(e, [[1, None]]), "is None"),
    bad(
        "generate: 1-D array of prompts",
        lambda e: _raw(e, np.arange(1, 4)),
        "must be [batch, length]; add a batch axis: prompts[None]",
    ),
    bad(
        "generate: 3-D array of prompts",
        lambda e: _raw(e, np.ones((1, 2, 3), np.int32)),
        "prompts=int32[1, 2, 3] array: must be [batch, length]",
    ),
    bad(
        "generate: float array of prompts",
        lambda e: _raw(e, np.ones((1, 3), np.float32)),
        "token ids must be ints",
    ),
    bad(
        "generate: flat prompt list",
        lambda e: _raw(e, [1, 2, 3]),
        "give a list of prompts: [[1, 2, 3]]",
    ),
    bad(
        "generate: text in a prompt list",
        lambda e: _raw(e, ["hello"]),
        "prompts[0]='hello': is text",
    ),
    bad("generate: text as prompts", lambda e: _raw(e, "hello"), "not text"),
    bad("generate: no prompts", lambda e: _raw(e, []), "give at least one prompt"),
    bad(
        "generate: an int as prompts",
        lambda e: _raw(e, 5),
        "prompts=5: must be a list of prompts",
    ),
    bad(
        "generate: an empty prompt",
        lambda e: _raw(e, [[1], []]),
        "prompts[1]=[]: is empty",
    ),
    bad(
        "generate: temperature nan",
        lambda e: _gen(e, temperature=float("nan")),
        "temperature=nan: must be a finite number >= 0",
    ),
    bad(
        "generate: temperature inf",
        lambda e: _gen(e, temperature=float("inf")),
        "temperature=inf",
    ),
    bad(
        "generate: negative temperature",
        lambda e: _gen(e, temperature=-1),
        "0 is greedy",
    ),
    bad(
        "generate: top_k 0",
        lambda e: _gen(e, temperature=1.0, top_k=0),
        "top_k=0: must be an int >= 1",
    ),
    bad(
        "generate: fractional top_k",
        lambda e: _gen(e, temperature=1.0, top_k=2.5),
        "top_k=2.5",
    ),
    bad(
        "generate: top_p above 1",
        lambda e: _gen(e, temperature=1.0, top_p=1.5),
        "top_p=1.5: must lie in (0, 1]",
    ),
    bad(
        "generate: top_p nan",
        lambda e: _gen(e, temperature=1.0, top_p=float("nan")),
        "top_p=nan",
    ),
    bad(
        "generate: negative min_p",
        lambda e: _gen(e, temperature=1.0, min_p=-0.1),
        "min_p=-0.1: must lie in [0, 1]",
    ),
    bad(
        "generate: repetition_penalty nan",
        lambda e: _gen(e, repetition_penalty=float("nan")),
        "repetition_penalty=nan: must be a finite number > 0",
    ),
    bad(
        "generate: repetition_penalty 0",
        lambda e: _gen(e, repetition_penalty=0),
        "repetition_penalty=0",
    ),
    bad(
        "generate: frequency_penalty inf",
        lambda e: _gen(e, frequency_penalty=float("inf")),
        "frequency_penalty=inf: must be a finite number",
    ),
    bad(
        "generate: max_new_tokens 0",
        lambda e: _gen(e, max_new_tokens=0),
        "max_new_tokens=0: must be an int >= 1",
    ),
    bad(
        "generate: negative max_new_tokens",
        lambda e: _gen(e, max_new_tokens=-3),
        "max_new_tokens=-3",
    ),
    bad(
        "generate: fractional max_new_tokens",
        lambda e: _gen(e, max_new_tokens=2.5),
        "max_new_tokens=2.5",
    ),
    bad(
        "generate: bool max_new_tokens",
        lambda e: _gen(e, max_new_tokens=True),
        "max_new_tokens=True",
    ),
    bad(
        "generate: a cache larger than memory",
        lambda e: _gen(e, [[1]] * 1000, max_new_tokens=10**9),
        "GiB of memory here; lower it",
    ),
    bad(
        "generate: a cache beyond int32 slots",
        lambda e: _gen(e, max_new_tokens=2**31),
        "> 2**31-1 slots",
    ),
    bad(
        "generate: beyond a learned position table",
        lambda e: (
            (m := llmjax.build("gpt2-tiny"))
            and generate(m, m.abstract_params(), [[1] * 100], max_new_tokens=40)
        ),
        "need 139 positions, beyond max_seq_len=128 of 'gpt2-tiny'",
    ),
    bad(
        "generate: stop id outside the vocabulary",
        lambda e: _gen(e, stop_tokens=[3, 512]),
        "stop_tokens[1]=512: is outside the vocabulary",
    ),
    bad(
        "generate: a 2-D array of stop ids",
        lambda e: _gen(e, stop_tokens=np.ones((1, 2), np.int64)),
        "stop_tokens=int64[1, 2] array: give a 1-D int array",
    ),
    bad(
        "generate: a bare int as stop_tokens",
        lambda e: _gen(e, stop_tokens=3),
        "stop_tokens=3: must be a list of token ids, e.g. [3]",
    ),
    bad(
        "generate: forbidden id outside the vocabulary",
        lambda e: _gen(e, forbidden_tokens=[-1]),
        "forbidden_tokens[0]=-1",
    ),
    bad(
        "generate: every id forbidden",
        lambda e: _gen(e, forbidden_tokens=range(512)),
        "forbids all 512 ids, so nothing can be drawn",
    ),
    bad(
        "generate: fractional seed",
        lambda e: _gen(e, seed=1.5),
        "seed=1.5: must be an int",
    ),
    bad("generate: text seed", lambda e: _gen(e, seed="0"), "seed='0'"),
    bad(
        "llmjax.generate: flat prompt list",
        lambda e: llmjax.generate(e.model, e.params, [5, 6], max_new_tokens=2),
        "[[5, 6]]",
    ),
    bad(
        "SamplingConfig: bool top_k",
        lambda e: SamplingConfig(temperature=1.0, top_k=True),
        "top_k=True",
    ),
]

OTHER_DECODERS = [
    bad(
        "speculative: num_draft 0",
        lambda e: _spec(e, num_draft=0),
        "num_draft=0: must be an int >= 1",
    ),
    bad(
        "speculative: max_new_tokens 0",
        lambda e: _spec(e, max_new_tokens=0),
        "max_new_tokens=0",
    ),
    bad(
        "speculative: top_p nan",
        lambda e: _spec(e, temperature=1.0, top_p=float("nan")),
        "top_p=nan",
    ),
    bad("speculative: flat prompt", lambda e: _spec(e, [1, 2]), "[[1, 2]]"),
    bad(
        "speculative: draft of another vocabulary",
        lambda e: _spec(e, draft=llmjax.build("llama3-tiny", vocab_size=256)),
        "draft has vocab_size=256 but the target has 512",
    ),
    bad(
        "best_of_n: n 0",
        lambda e: best_of_n(e.model, e.params, [1, 2], 0, max_new_tokens=2),
        "n=0: must be an int >= 1",
    ),
    bad(
        "best_of_n: a batch instead of one prompt",
        lambda e: best_of_n(e.model, e.params, [[1, 2]], 2, max_new_tokens=2),
        "must be one list of token ids, not a batch",
    ),
    bad(
        "best_of_n: temperature nan",
        lambda e: best_of_n(e.model, e.params, [1], 2, temperature=float("nan"), max_new_tokens=2),
        "temperature=nan",
    ),
    bad(
        "best_of_n: an empty prompt",
        lambda e: best_of_n(e.model, e.params, [], 2, max_new_tokens=2),
        "prompt=[]: is empty",
    ),
    bad(
        "self_consistency: text prompt",
        lambda e: self_consistency(e.model, e.params, "hi", 2, len, max_new_tokens=2),
        "prompt='hi': is text",
    ),
    bad(
        "self_consistency: fractional n",
        lambda e: self_consistency(e.model, e.params, [1], 2.5, len, max_new_tokens=2),
        "n=2.5",
    ),
    bad(
        "cot_decode: max_new_tokens 0",
        lambda e: cot_decode(e.model, e.params, [1, 2], k=2, max_new_tokens=0),
        "max_new_tokens=0",
    ),
    bad(
        "cot_decode: k beyond the vocabulary",
        lambda e: cot_decode(e.model, e.params, [1, 2], k=600, max_new_tokens=2),
        "k=600: must be an int in [1, 513)",
    ),
    bad(
        "cot_decode: prompt id outside the vocabulary",
        lambda e: cot_decode(e.model, e.params, [1, 700], k=2, max_new_tokens=2),
        "prompt[1]=700",
    ),
    bad(
        "cot_decode: stop id outside the vocabulary",
        lambda e: cot_decode(e.model, e.params, [1], k=2, max_new_tokens=2, stop_tokens=[900]),
        "stop_tokens[0]=900",
    ),
    bad(
        "quantize: int4 group size that does not divide",
        lambda e: quantize(e.model, e.params, "int4", 48),
        "int4 group_size=48: must be even and divide",
    ),
]

APPLY = [
    bad(
        "apply: float tokens",
        lambda e: _apply(e, X.astype(np.float32)),
        "got float32[2, 5]; cast them: tokens.astype(jnp.int32)",
    ),
    bad(
        "apply: 1-D tokens",
        lambda e: _apply(e, X[0]),
        "got int32[5]; add a batch axis: tokens[None]",
    ),
    bad(
        "apply: 3-D tokens",
        lambda e: _apply(e, X[None]),
        "got int32[1, 2, 5]; give one row of ids per sequence",
    ),
    bad(
        "apply: positions of the wrong shape",
        lambda e: _apply(e, positions=np.arange(5)),
        "positions must have the tokens' shape [batch, length] = [2, 5]; got int32[5]",
    ),
    bad(
        "apply: float positions under jit",
        lambda e: _apply(e, jit=True, positions=np.zeros((2, 5), np.float32)),
        "positions must be int, got float32[2, 5]",
    ),
    bad(
        "apply: segment_ids of the wrong shape under jit",
        lambda e: _apply(e, jit=True, segment_ids=np.ones((2, 4), np.int32)),
        "segment_ids must have the tokens' shape [batch, length] = [2, 5]; got int32[2, 4]",
    ),
    bad(
        "apply: float segment_ids",
        lambda e: _apply(e, segment_ids=np.ones((2, 5), np.float32)),
        "segment_ids must be int",
    ),
    bad(
        "apply: attention_mask of the wrong shape",
        lambda e: _apply(e, attention_mask=np.ones((1, 5), bool)),
        "attention_mask must have the tokens' shape [batch, length] = [2, 5]; got bool[1, 5]",
    ),
    bad(
        "apply: float attention_mask",
        lambda e: _apply(e, attention_mask=np.ones((2, 5), np.float32)),
        "attention_mask.astype(bool)",
    ),
    bad(
        "apply: float logit_index",
        lambda e: _apply(e, logit_index=np.zeros((2, 1), np.float32)),
        "logit_index must be int [batch=2, N]",
    ),
    bad(
        "apply: logit_index beyond the tokens",
        lambda e: _apply(e, logit_index=np.full((2, 1), 5, np.int32)),
        "logit_index must lie in [0, 5)",
    ),
    bad(
        "apply: cache for another batch size under jit",
        lambda e: _apply(e, jit=True, cache=e.model.init_cache(3, 8)),
        "cache.k[0] has shape [3, 2, 8, 16], expected [2, 2, 8, 16]",
    ),
    bad(
        "apply: cache for another layer count",
        lambda e: _apply(e, cache=llmjax.build("llama3-tiny", n_layers=3).init_cache(2, 8)),
        "cache has 3 layers but 'llama3-tiny' has n_layers=2",
    ),
    bad(
        "apply: cache for another head layout",
        lambda e: _apply(e, cache=llmjax.build("llama3-tiny", n_kv_heads=4).init_cache(2, 8)),
        "cache.k[0] has shape [2, 4, 8, 16], expected [2, 2, 8, 16]",
    ),
    bad(
        "apply: cache segment ids for another batch size",
        lambda e: _apply(e, cache=_cache(e, seg_BS=np.zeros((1, 8), np.int32))),
        "cache.seg_BS has shape [1, 8], expected [2, 8] [batch, max_len]",
    ),
    bad(
        "apply: cache lengths for another batch size",
        lambda e: _apply(e, cache=_cache(e, length_B=np.zeros((3,), np.int32))),
        "cache.length_B has shape [3], expected [2] [batch]",
    ),
    bad(
        "apply: a dict as the cache",
        lambda e: _apply(e, cache={}),
        "cache must be a KVCache from model.init_cache",
    ),
    bad(
        "apply: negative learned position",
        lambda e: (m := llmjax.build("gpt2-tiny")).apply(
            m.abstract_params(), X, positions=-np.ones((2, 5), np.int32)
        ),
        "positions must lie in [0, 128), got min -1",
    ),
]

CLI = [
    Cli(
        "llmjax generate: prompt ids that are not ints",
        lambda e: _with_ids(e, "a,b"),
        "--prompt-ids 'a,b'",
    ),
    Cli(
        "llmjax generate: no prompt ids", lambda e: _with_ids(e, ","), "give at least one token id"
    ),
    Cli(
        "llmjax generate: prompt id outside the vocabulary",
        lambda e: _with_ids(e, "2,99999"),
        "--prompt-ids 99999: is outside the vocabulary [0, 512)",
    ),
    Cli(
        "llmjax generate: prompt id outside the vocabulary of a run",
        lambda e: ["generate", "--ckpt", str(e.run), "--prompt-ids", "2,512"],
        "--prompt-ids 512: is outside the vocabulary",
    ),
    Cli(
        "llmjax generate: stop id outside the vocabulary",
        lambda e: _hf(e, "--stop-ids", "3,700"),
        "--stop-ids 700: is outside the vocabulary",
    ),
    Cli(
        "llmjax generate: stop ids that are not ints",
        lambda e: _hf(e, "--stop-ids", "3,x"),
        "--stop-ids '3,x'",
    ),
    Cli(
        "llmjax generate: --max-new-tokens 0",
        lambda e: _hf(e, "--max-new-tokens", "0"),
        "--max-new-tokens 0: must be an int >= 1",
    ),
    Cli(
        "llmjax generate: --temperature nan",
        lambda e: _hf(e, "--temperature", "nan"),
        "--temperature nan: must be a finite number >= 0",
    ),
    Cli(
        "llmjax generate: --top-p 2",
        lambda e: _hf(e, "--top-p", "2"),
        "--top-p 2.0: must lie in (0, 1]",
    ),
    Cli(
        "llmjax generate: --top-k 0",
        lambda e: _hf(e, "--top-k", "0"),
        "--top-k 0: must be an int >= 1",
    ),
    Cli("llmjax generate: --min-p 1.5", lambda e: _hf(e, "--min-p", "1.5"), "--min-p 1.5"),
    Cli(
        "llmjax generate: --repetition-penalty 0",
        lambda e: _hf(e, "--repetition-penalty", "0"),
        "--repetition-penalty 0.0: must be a finite number > 0",
    ),
    Cli(
        "llmjax generate: --num-draft 0",
        lambda e: _hf(e, "--draft", str(e.hf), "--num-draft", "0"),
        "--num-draft 0: must be an int >= 1",
    ),
    Cli(
        "llmjax generate: --draft with --repetition-penalty",
        lambda e: _hf(e, "--draft", str(e.hf), "--repetition-penalty", "1.2"),
        "takes no history penalty",
    ),
    Cli(
        "llmjax generate: --group-size that does not divide",
        lambda e: _hf(e, "--quantize", "int4", "--group-size", "48"),
        "int4 group_size=48: must be even and divide",
    ),
    Cli("llmjax generate: --group-size 0", lambda e: _hf(e, "--group-size", "0"), "--group-size 0"),
    Cli(
        "llmjax generate: --draft of another vocabulary",
        lambda e: _hf(e, "--draft", str(_zeros_hf(e, "draft", vocab_size=256))),
        "draft has vocab_size=256 but the target has 512",
    ),
    Cli(
        "llmjax generate: --prompt without tokenizer.model",
        lambda e: ["generate", "--hf", _no_tokenizer(e), "--prompt", "To be"],
        "has no tokenizer.model or tokenizer.json to encode it; give token ids",
    ),
    Cli(
        "llmjax generate: a tokenizer larger than the model",
        lambda e: [
            "generate",
            "--hf",
            str(_zeros_hf(e, "small", tokenizer=True, vocab_size=256)),
            "--prompt",
            "To be",
        ],
        "its tokenizer has 512 pieces but the model only 256 ids",
    ),
    Cli(
        "llmjax generate: --ckpt that does not exist",
        lambda e: ["generate", "--ckpt", "no/such/run", "--prompt", "x"],
        "--ckpt no/such/run: no such file or directory",
    ),
    Cli(
        "llmjax generate: --hf that does not exist",
        lambda e: ["generate", "--hf", str(e.tmp / "missing"), "--prompt-ids", "1"],
        "missing: no such file or directory; give a local Hugging Face model directory",
    ),
    Cli(
        "llmjax generate: --draft that does not exist",
        lambda e: _hf(e, "--draft", "no/such/draft"),
        "--draft no/such/draft: no such file or directory",
    ),
    Cli(
        "llmjax generate: relative --hf path, id outside the vocabulary",
        lambda e: _hf(e, "--stop-ids", "600", path=os.path.relpath(e.hf)),
        "--stop-ids 600",
    ),
]

CASES = GENERATE + OTHER_DECODERS + APPLY + CLI
