"""Tiny random-weight llama GGUF model (byte-level SPM vocab, ~0.5 MB) for tests and demos.

Needs the optional 'demo' extra (numpy, gguf), imported only when a model is written."""

from __future__ import annotations

import os
import pathlib
import tempfile

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 16384
"""Byte-level tokens: a decision prompt (system turn, example turns, facts) is ~4,500 of them."""
RMS_EPS = 1e-5

# Token ids: 0..2 specials, 3..258 the bytes <0x00>..<0xFF>, 259 the SPM word marker.
_SPECIALS = ("<unk>", "<s>", "</s>")
_BYTE_BASE = len(_SPECIALS)
_SPACE_ID = _BYTE_BASE + 256
N_VOCAB = _SPACE_ID + 1

# gguf TokenType values (written as plain ints so the module needs no enum at import time).
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_BYTE = 1, 2, 3, 6

# Logit offsets so that grammar-constrained JSON ends well within 128 tokens at any temperature
# (strings close soon, numbers stop after a few digits) and non-ASCII / control bytes are rare.
_FAVOURED = {'"': 3.0, ",": 2.5, "}": 2.5}
_DISFAVOURED = -6.0
_CARRIER = 8.0


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = list(_SPECIALS)
    types = [_TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(_TYPE_BYTE)
    tokens.append("\u2581")
    types.append(_TYPE_NORMAL)
    scores = [0.0] * len(tokens)
    return tokens, scores, types


def _logit_bias() -> list[float]:
    bias = [0.0] * N_VOCAB
    for b in range(256):
        if b >= 0x80 or (b < 0x20 and b != 0x0A):
            bias[_BYTE_BASE + b] = _DISFAVOURED
    for ch, value in _FAVOURED.items():
        bias[_BYTE_BASE + ord(ch)] = value
    return bias


def write_tiny_model(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the model to ``path`` (atomically; same seed, same bytes) and return ``path``."""
    import gguf
    import numpy as np

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    head_dim = N_EMBD // N_HEAD
    # Dimension 0 of the residual stream is a constant that no layer reads or writes; it
    # dominates the final RMS norm (so comes out as ~sqrt(N_EMBD)) and column 0 of the output
    # head turns it into a per-token logit bias. The other dimensions give logits of std ~1.
    embd = rand(N_VOCAB, N_EMBD, scale=0.05)
    embd[:, 0] = _CARRIER
    output = rand(N_VOCAB, N_EMBD, scale=2.5)
    output[:, 0] = np.asarray(_logit_bias(), dtype=np.float32) / np.sqrt(N_EMBD)

    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", embd)]
    for i in range(N_LAYER):
        attn_out = rand(N_EMBD, N_EMBD, scale=0.05)
        attn_out[0, :] = 0.0
        ffn_down = rand(N_EMBD, N_FF, scale=0.05)
        ffn_down[0, :] = 0.0
        q, k, v = (rand(N_EMBD, N_EMBD, scale=0.1) for _ in range(3))
        gate, up = rand(N_FF, N_EMBD, scale=0.1), rand(N_FF, N_EMBD, scale=0.1)
        for w in (q, k, v, gate, up):
            w[:, 0] = 0.0  # the bias carrier must not feed the layers
        tensors += [
            (f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32)),
            (f"blk.{i}.attn_q.weight", q),
            (f"blk.{i}.attn_k.weight", k),
            (f"blk.{i}.attn_v.weight", v),
            (f"blk.{i}.attn_output.weight", attn_out),
            (f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32)),
            (f"blk.{i}.ffn_gate.weight", gate),
            (f"blk.{i}.ffn_up.weight", up),
            (f"blk.{i}.ffn_down.weight", ffn_down),
        ]
    tensors += [
        ("output_norm.weight", np.ones(N_EMBD, dtype=np.float32)),
        ("output.weight", output),
    ]

    tokens, scores, types = _vocab()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, "llama")
        writer.add_name("prng-tiny-random")
        writer.add_vocab_size(N_VOCAB)
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_file_type(0)  # all F32
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        for name, data in tensors:
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
