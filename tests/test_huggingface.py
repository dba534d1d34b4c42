"""Hugging Face models built from small configs (nothing downloaded) through sparsify →
train → save/load → compile: transformers' Conv1D is swapped like nn.Linear, a layer whose
weight is tied to the token embedding is left as it is and reported."""

from __future__ import annotations

import pytest
import torch

import bornsparse
from bornsparse import sparsify
from bornsparse.nn import DCTPlusSparseLinear, SparseLinear

transformers = pytest.importorskip("transformers")

VOCAB = 64


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, hidden_size=32, intermediate_size=48,
                                   vocab_size=VOCAB, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                  intermediate_size=48, vocab_size=VOCAB,
                                  max_position_embeddings=32)
    return transformers.BertForMaskedLM(cfg)


# name -> (builder, the layers that must be swapped, the tied layer and its partner)
MODELS = {
    "gpt2": (gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"],
             ("lm_head", "transformer.wte")),
    "llama": (llama, ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"],
              ("lm_head", "model.embed_tokens")),
    "bert": (bert, ["bert.encoder.layer.0.attention.self.query",
                    "cls.predictions.transform.dense"],
             ("cls.predictions.decoder", "bert.embeddings.word_embeddings")),
}


def _weights(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparsify_train_save_load_compile(name, tmp_path):
    build, swapped, (tied, partner) = MODELS[name]
    torch.manual_seed(0)
    model = build()
    dense_weights = _weights(model)
    report = sparsify(model, kind="dctps", density=0.1, seed=0)
    for layer in swapped:
        assert isinstance(model.get_submodule(layer), DCTPlusSparseLinear)
    # the tie is kept: the output layer still reads the embedding's weight
    assert report.tied == {tied: [partner]}
    assert model.get_submodule(tied).weight is model.get_submodule(partner).weight
    assert tied not in [r.name for r in report.layers] and "tied" in str(report)
    assert _weights(model) < dense_weights / 2
    if name == "gpt2":  # every Conv1D, none left dense
        conv1d = transformers.pytorch_utils.Conv1D
        assert not [n for n, m in model.named_modules() if isinstance(m, conv1d)]
        assert len(report.layers) == 8

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    path = tmp_path / "model.safetensors"
    bornsparse.save(model, path)
    fresh = build()  # the dense architecture (LLaMA's rotary buffer cannot live on meta)
    bornsparse.load(fresh, path)
    fresh.eval()
    assert fresh.get_submodule(tied).weight is fresh.get_submodule(partner).weight
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(fresh(input_ids=ids).logits, want)
        torch._dynamo.reset()
        got = torch.compile(fresh, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_gpt2_built_on_meta_loads_and_compiles_with_inductor(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    sparsify(model, kind="sparse", density=0.2, seed=0)
    model.eval()
    path = tmp_path / "model.safetensors"
    bornsparse.save(model, path)
    with torch.device("meta"):
        fresh = gpt2()
    bornsparse.load(fresh, path)
    fresh.eval()
    assert isinstance(fresh.transformer.h[1].attn.c_proj, SparseLinear)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch._dynamo.reset()
        got = torch.compile(fresh)(input_ids=ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["permuted", "permuted_offset"])
def test_structured_kinds_take_conv1d(kind):
    torch.manual_seed(0)
    model = gpt2()
    report = sparsify(model, kind=kind, density=0.3, seed=0)
    assert len(report.layers) == 8 and report.tied == {"lm_head": ["transformer.wte"]}
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()


def test_conv1d_support_matches_its_transposed_weight():
    """A Conv1D's values are its weight at the support, read through the transpose."""
    from bornsparse.sparsity.swap import make_sparse_layer, support_of_weight

    conv = transformers.pytorch_utils.Conv1D(5, 3)  # 3 -> 5, weight (3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 4] = mask[2, 1] = mask[1, 1] = True
    idx, flat = support_of_weight(conv, mask.flatten().nonzero().flatten())
    assert idx.tolist() == [[1, 1, 4], [1, 2, 0]]  # (out, in), row-major
    assert torch.equal(conv.weight.detach().flatten()[flat], conv.weight.detach().T[idx[0], idx[1]])
    layer = make_sparse_layer(conv, idx)
    x = torch.randn(4, 3)
    assert torch.allclose(layer(x), x @ (conv.weight * mask) + conv.bias, atol=1e-6)


def _lm_loss(out, y):
    return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def test_snip_keeps_conv1d_weights_read_through_the_transpose():
    """SNIP on GPT-2: each Conv1D's weight is stored (in, out); the sparse layer's entries
    are (out, in), with equal counts per output row under "epf"."""
    from bornsparse.sparsity import prune_at_init

    torch.manual_seed(0)
    model = gpt2()
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # (32, 128) = (in, out)
    prune_at_init(model, "snip", 0.2, data=(ids, ids), loss_fn=_lm_loss, distribution="epf")
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, SparseLinear) and layer.dense_shape == (128, 32)
    # every entry is the stored weight at (in, out) = (col, row): values were read transposed
    rows, cols = layer.indices.long()
    assert torch.equal(layer.values.detach(), before[cols, rows])
    # epf: equal count in every *output* row
    counts = torch.bincount(rows, minlength=128)
    assert counts.max() - counts.min() <= 1


def test_imp_and_rigl_run_on_conv1d():
    from bornsparse.sparsity import IMP, RigL

    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    model = gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    imp = IMP(model, opt, rounds=1, density=0.3, rewind_iteration=1)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        imp.step()
    imp.prune()
    dense = model.transformer.h[0].attn.c_attn.weight
    masked = dense.detach().clone()  # (in, out), pruned and rewound
    moments = opt.state[dense]["exp_avg"].clone()
    imp.to_sparse()
    layer = model.transformer.h[0].attn.c_attn
    rows, cols = layer.indices.long()
    assert torch.equal(layer.values.detach(), masked[cols, rows])
    assert int((masked != 0).sum()) == layer.nnz
    # the optimizer's moments follow their entries through the transpose
    assert torch.equal(opt.state[layer.values]["exp_avg"], moments[cols, rows])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()

    torch.manual_seed(0)
    model = gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rigl = RigL(model, opt, density=0.2, total_steps=4, delta=2)
    assert isinstance(model.transformer.h[1].mlp.c_proj, SparseLinear)
    assert model.lm_head.weight is model.transformer.wte.weight
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        if rigl.step():
            opt.step()
        opt.zero_grad()
