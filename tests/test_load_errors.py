"""Bad checkpoints and configs: each gives an error naming the file, field or tensor, and what was expected."""
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mintune
from mintune import ModelFileError, ConfigError
from tiny_hf import save_hf_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    save_hf_model("llama-smollm", d)
    return d


@pytest.fixture
def model_dir(good, tmp_path):
    """A fresh copy of a good checkpoint, to break."""
    d = tmp_path / "model"
    shutil.copytree(good, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config_json(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        mintune.load_model(model_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mintune.load_model(tmp_path / "nowhere")


def test_unsupported_model_type_lists_supported(model_dir):
    edit_config(model_dir, model_type="bert")
    with pytest.raises(ConfigError) as e:
        mintune.load_model(model_dir)
    msg = str(e.value)
    assert "config.json" in msg and "'bert'" in msg
    for family in ["gpt2", "gpt_neo", "opt", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"]:
        assert family in msg


def test_config_missing_a_required_field(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*'hidden_size'"):
        mintune.load_model(model_dir)


def test_config_not_json(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON \(line 2"):
        mintune.load_model(model_dir)


def test_unsupported_rope_type(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"rope type 'dynamic' is not supported"):
        mintune.load_model(model_dir)


def test_missing_tensor_is_named(model_dir):
    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        mintune.load_model(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"model\.safetensors: unexpected tensor\(s\) "
                                              r"model\.layers\.0\.self_attn\.extra_proj\.weight"):
        mintune.load_model(model_dir)


def test_shape_mismatch_names_tensor_and_both_shapes(model_dir):
    edit_config(model_dir, intermediate_size=64)  # the checkpoint has 80
    with pytest.raises(ModelFileError) as e:
        mintune.load_model(model_dir)
    msg = str(e.value)
    assert "model.safetensors" in msg and "mlp" in msg
    assert "(80, 48)" in msg or "(48, 80)" in msg
    assert "(64, 48)" in msg or "(48, 64)" in msg


def test_truncated_safetensors_names_the_file(model_dir):
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model\.safetensors: truncated"):
        mintune.load_model(model_dir)


def test_corrupt_header_names_the_file(model_dir):
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12  # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: corrupt safetensors header"):
        mintune.load_model(model_dir)


def test_not_a_safetensors_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ModelFileError, match=r"model\.safetensors: not a safetensors file"):
        mintune.load_model(model_dir)


def test_header_length_past_end_of_file(model_dir):
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: truncated or corrupt"):
        mintune.load_model(model_dir)


def test_integer_tensor_is_refused(model_dir):
    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"] = torch.ones(48, dtype=torch.int32)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"'model\.norm\.weight' has dtype I32; expected a float"):
        mintune.load_model(model_dir)


def test_index_lists_a_missing_shard(good, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(good).save_pretrained(d, max_shard_size="40KB")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelFileError, match=rf"index\.json: lists shard {shard.name}, which is missing"):
        mintune.load_model(d)


def test_index_points_at_the_wrong_shard(good, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(good).save_pretrained(d, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match=rf"says tensor '{name}' is in {shards[1]}"):
        mintune.load_model(d)


def test_nothing_is_ever_unpickled(good, model_dir, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    mintune.load_model(good)  # a normal load reads safetensors only
    # a directory with only a pickle checkpoint is refused without opening it
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ModelFileError, match=r"pickle checkpoints.*never unpickles"):
        mintune.load_model(model_dir)


def test_failed_save_keeps_the_previous_files(good, tmp_path, monkeypatch):
    import mintune.hf as hf

    model = mintune.load_model(good)
    out = tmp_path / "out"
    mintune.save_pretrained(model, out)
    before = (out / "model.safetensors").read_bytes()

    def half_write(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        mintune.save_pretrained(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
