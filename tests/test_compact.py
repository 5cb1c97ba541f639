"""Compact folders end to end: exact reload, sizes, config.json convention, sharding, and every kind of damage
caught with a one-line error that names the tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsellm
from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from sparsellm.format import compact
from sparsellm.format.manifest import MANIFEST_FILE, checksum
from sparsellm.models import decoder_blocks, linear_layers, load_model, weight_matrix
from sparsellm.weights.quant import QuantScheme, grid_of


@pytest.fixture(scope="module")
def pruned(llama_folder, tmp_path_factory):
    """A tiny Llama pruned 2:4 by SparseGPT with 4-bit weights, and its compact folder."""
    model, tokenizer = load_model(llama_folder)
    report = sparsellm.prune(model, tokenizer, method="sparsegpt", pattern="2:4", nsamples=4, seqlen=64,
                             quantization=QuantScheme(4, 32, symmetric=False))
    folder = sparsellm.save(model, tokenizer, tmp_path_factory.mktemp("compact") / "q24", report.to_dict())
    return model, tokenizer, folder


def state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_quantized_24_reloads_exactly_and_resaves_identically(pruned, tmp_path):
    model, tokenizer, folder = pruned
    tokens = torch.randint(3, 300, (2, 20))
    reloaded = sparsellm.load(folder, kernels="dense")
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    prefix, blocks = decoder_blocks(reloaded)
    for name, module in linear_layers(blocks[0], f"{prefix}.0").items():
        assert grid_of(module) is not None, name
    again = sparsellm.save(reloaded, tokenizer, tmp_path / "again")
    first, second = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_manifest_and_config_follow_the_convention(pruned):
    model, _, folder = pruned
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    layers = manifest["layers"]
    assert len(layers) == 3 * 7 and all(entry["layout"] == "sparse-nm" for entry in layers.values())
    assert all(entry["bytes"] < 0.25 * entry["dense_bytes"] for entry in layers.values())
    tensors = load_file(folder / "model.safetensors")
    assert set(tensors) == set(manifest["tensors"])
    for name, tensor in tensors.items():
        entry = manifest["tensors"][name]
        assert entry["shape"] == list(tensor.shape) and entry["crc32"] == checksum(tensor)
    down = "model.layers.1.mlp.down_proj"
    assert {f"{down}.{suffix}" for suffix in ("shape", "compressed", "patterns", "weight_scale",
                                              "weight_zero_point")} <= set(tensors)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == compact.QUANTIZED_FORMAT
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights | {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False} == weights
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == "sparse-nm" and sparsity["sparsity_structure"] == "2:4"
    assert len(sparsity["targets"]) == 21 and "lm_head" in sparsity["ignore"]
    zeros = sum((weight_matrix(m) == 0).sum().item() for b in decoder_blocks(model)[1] for m in linear_layers(b).values())
    total = sum(weight_matrix(m).numel() for b in decoder_blocks(model)[1] for m in linear_layers(b).values())
    assert sparsity["global_sparsity"] == pytest.approx(zeros / total)


def test_unstructured_compact_matches_dense_save_in_bfloat16_and_shards(llama_folder, tmp_path):
    model, tokenizer = load_model(llama_folder)
    report = sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.7)
    dense = sparsellm.save(model, tokenizer, tmp_path / "dense", report.to_dict(), format="dense", dtype="bfloat16")
    packed = compact.save(model, tokenizer, tmp_path / "packed", report.to_dict(), dtype=torch.bfloat16,
                          max_shard_bytes=20_000)
    assert len(list(packed.glob("model-*-of-*.safetensors"))) > 2 and (packed / compact.INDEX_FILE).exists()
    from_dense, _ = load_model(dense, dtype="bfloat16")
    from_packed = sparsellm.load(packed, dtype="bfloat16", kernels="dense")
    for name, tensor in from_dense.state_dict().items():
        assert torch.equal(from_packed.state_dict()[name], tensor), name
    layers = json.loads((packed / MANIFEST_FILE).read_text())["layers"]
    assert {entry["layout"] for entry in layers.values()} == {"sparse-bitmask"}
    packed_bytes = sum(entry["bytes"] for entry in layers.values())
    assert packed_bytes < 0.42 * sum(entry["dense_bytes"] for entry in layers.values())


def test_compress_cli_packs_a_dense_folder(llama_folder, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["prune", "--model", str(llama_folder), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4",
                 "--seqlen", "64", "--format", "dense", "--output", str(out)]) == 0
    assert not compact.is_compact(out)
    assert main(["compress", str(out), "--output", str(tmp_path / "packed"), "--dtype", "bfloat16"]) == 0
    assert "% of dense" in capsys.readouterr().out
    original, _ = load_model(out)
    packed, _ = load_model(tmp_path / "packed")
    for name, tensor in original.state_dict().items():
        assert torch.equal(packed.state_dict()[name], tensor.to(torch.bfloat16).float()), name
    assert main(["info", str(tmp_path / "packed")]) == 0
    table = capsys.readouterr().out
    assert "sparse-bitmask" in table and "of dense" in table and "16" in table
    assert main(["compress", str(out), "--output", str(tmp_path / "q8"), "--bits", "8", "--group-size", "0"]) == 0
    quantized = sparsellm.load(tmp_path / "q8", kernels="dense")
    for name, module in linear_layers(decoder_blocks(quantized)[1][0], "model.layers.0").items():
        before = weight_matrix(original.get_submodule(name))
        after = weight_matrix(module)
        assert torch.equal(after == 0, before == 0), name  # pruned weights stay exactly zero
        assert (after - before).abs().max() <= before.abs().max() / 127 / 2 * 1.01, name


def test_prune_cli_quantized_compact_info(llama_folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["prune", "--model", str(llama_folder), "--method", "wanda", "--pattern", "2:4", "--bits", "4",
                 "--group-size", "32", "--asym", "--nsamples", "4", "--seqlen", "64", "--output", str(out)]) == 0
    assert "+ 4-bit group 32 asym" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "compact" and all(t["bits"] == 4 and t["layout"] == "sparse-nm 2:4"
                                                  for t in result["tensors"])
    assert main(["eval", "--model", str(out), "--seqlen", "64", "--windows", "2"]) == 0


def test_failed_save_leaves_nothing(llama_folder, tmp_path):
    model, tokenizer = load_model(llama_folder)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(SparseLLMError, match=r"model\.layers\.1\.mlp\.up_proj: values overflow float16"):
        sparsellm.save(model, tokenizer, tmp_path / "out", dtype="float16")
    assert list(tmp_path.iterdir()) == []


# -- damage --------------------------------------------------------------------------------------


def damaged_copy(folder, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    return copy


def rewrite(folder, change):
    """Change tensors and update the manifest's checksums: damage a buggy writer could do, not a disk."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for name, tensor in tensors.items():
        manifest["tensors"][name].update(shape=list(tensor.shape), crc32=checksum(tensor))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def expect_error(folder, message, capsys):
    with pytest.raises(SparseLLMError, match=message):
        sparsellm.load(folder, kernels="dense")
    capsys.readouterr()
    assert main(["-q", "eval", "--model", str(folder), "--seqlen", "32", "--windows", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsellm: error:"), lines


def test_flipped_byte_is_caught_by_checksum(pruned, tmp_path, capsys):
    folder = damaged_copy(pruned[2], tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))
    expect_error(folder, r"tensor \S+ in model.safetensors fails its checksum", capsys)


def test_truncated_file_names_the_first_incomplete_tensor(pruned, tmp_path, capsys):
    folder = damaged_copy(pruned[2], tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5000])
    expect_error(folder, r"model.safetensors is truncated: tensor \S+ needs bytes", capsys)
    path.write_bytes(path.read_bytes()[:6])
    expect_error(folder, "not even a header", capsys)


def test_edited_shapes_are_named(pruned, tmp_path, capsys):
    folder = damaged_copy(pruned[2], tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["tensors"]["model.layers.0.mlp.up_proj.patterns"]["shape"] = [64, 11]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    expect_error(folder, "tensor model.layers.0.mlp.up_proj.patterns in model.safetensors is uint8 .* the manifest "
                         "says uint8 .64, 11.", capsys)

    folder = damaged_copy(pruned[2], tmp_path / "b")
    rewrite(folder, lambda t: t.__setitem__("model.layers.2.self_attn.o_proj.shape", torch.tensor([64, 60])))
    expect_error(folder, r"tensor model.layers.2.self_attn.o_proj.shape says \[64, 60\]", capsys)

    folder = damaged_copy(pruned[2], tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    expect_error(folder, r"tensor model.layers.0.mlp.gate_proj.weight: the checkpoint holds \[128, 64\], the model "
                         r"its config.json describes expects \[96, 64\]", capsys)


def test_bitmask_count_mismatch_is_named(llama_folder, tmp_path, capsys):
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.6)
    folder = sparsellm.save(model, tokenizer, tmp_path / "packed")
    name = "model.layers.1.self_attn.v_proj.bitmask"

    def flip_one_bit(tensors):
        tensors[name][0, 0] ^= 1

    rewrite(folder, flip_one_bit)
    expect_error(folder, r"model.layers.1.self_attn.v_proj.bitmask: its set bits do not match the row offsets",
                 capsys)


def test_missing_manifest_or_tensor(pruned, tmp_path, capsys):
    folder = damaged_copy(pruned[2], tmp_path)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["tensors"]["model.norm.weight"]["file"] = "model-2.safetensors"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    expect_error(folder, "model-2.safetensors is missing", capsys)
    rewrite(folder, lambda t: t.pop("model.norm.weight"))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["tensors"]["model.norm.weight"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    expect_error(folder, "tensor model.norm.weight is missing from", capsys)


def test_tied_embeddings_are_written_once(tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny import make_config, make_tokenizer

    config = make_config("llama")
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    for format in ("compact", "dense"):
        folder = sparsellm.save(model, make_tokenizer(), tmp_path / format, format=format, dtype="bfloat16")
        assert "lm_head.weight" not in load_file(folder / "model.safetensors")
        reloaded = sparsellm.load(folder, kernels="dense")
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
        assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())
