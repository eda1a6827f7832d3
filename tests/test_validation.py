"""Every value a user gives is checked where it is read, and the message names the key, file or line:
recipe fields (types, choices, ranges, joint rules), data rows, chat messages, config.json, generation
arguments, evaluation settings, devices, tokenizers that do not fit the model, sequences longer than the
model's positions."""
import json
import shutil

import pytest
import torch

import mintune
import mintune.evaluate as evaluate_mod
import mintune.hf as hf
from mintune.config import ConfigError
from mintune.data import DataConfig, DataError, load_task
from mintune.evaluate import token_nll
from mintune.recipe import load_config
from mintune.tokenizer import ChatTemplateError
from mintune.train import TrainingError, train


@pytest.fixture(scope="module")
def chat(chat_dir):
    return mintune.load_model(chat_dir), mintune.load_tokenizer(chat_dir)


# ---- the recipe ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("--train.warmup_steps=-1", r"train\.warmup_steps must be >= 0, got -1"),
    ("--train.save_every=-5", r"train\.save_every must be >= 0, got -5"),
    ("--train.keep_last=-1", r"train\.keep_last must be >= 0, got -1"),
    ("--train.eval_batch_size=0", r"train\.eval_batch_size must be >= 1, got 0"),
    ("--data.validation_fraction=0", r"data\.validation_fraction must be in \(0, 1\), got 0"),
    ("--data.validation_fraction=1.5", r"data\.validation_fraction must be in \(0, 1\), got 1\.5"),
    ("--train.lr=nan", r"train\.lr: expected a finite number, got nan"),
    ("--train.min_lr_ratio=2", r"train\.min_lr_ratio must be in \[0, 1\], got 2"),
    ("--method.dropout=1", r"method\.dropout must be in \[0, 1\), got 1"),
    ("--train.seed=-1", r"train\.seed must be in \[0, 4294967295\]"),
    ("--train.output_dir=", r"train\.output_dir is empty"),
    ("--model.path=", r"model\.path is empty"),
    ("--model.device=gpu", r"model\.device must be cpu, cuda, cuda:N or auto, got 'gpu'"),
    ("--model.dtype=float8", r"model\.dtype must be one of 'float32', 'bfloat16', 'float16', got 'float8'"),
    ("--method.targets=[1, 2]", r"method\.targets: expected a list of names"),
    ("--data.mix=[{weight = \"2\"}]", r"data\.mix\[0\]\.weight: expected a finite number, got '2'"),
    ("--data.mix=[{max_length = 1}]", r"data\.max_length must be at least 2"),
    ("--data.mix=[\"quotes\"]", r"data\.mix\[0\]: expected a table of \[data\] fields"),
    ("--train.early_stopping_metric=sentiment/accuracy", r"needs evaluations during training: set "
                                                         r"train\.eval_every > 0"),
])
def test_recipe_values_are_checked_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_float16_full_fine_tuning_is_refused_with_the_right_advice():
    with pytest.raises(ValueError) as e:
        load_config(None, ["--model.dtype=float16", "--method.name=full"])
    msg = str(e.value)
    assert 'set model.dtype = "float32" or "bfloat16"' in msg and "lr" not in msg.replace("train.precision", "")


def test_a_config_file_that_is_not_utf8_names_the_line(tmp_path):
    (tmp_path / "c.toml").write_bytes(b'[train]\nlr = 1e-3\n# caf\xe9\n')
    with pytest.raises(ValueError, match=r"c\.toml line 3, column 6: not UTF-8 text \(byte 0xe9\)"):
        load_config(str(tmp_path / "c.toml"))


def test_an_unmeasured_early_stopping_metric_is_caught_before_training(chat_dir, tmp_path):
    cfg = load_config(None, [f"--model.path={chat_dir}", f"--train.output_dir={tmp_path / 'run'}",
                             "--train.eval_every=2", "--train.early_stopping_metric=classification/acuracy"])
    with pytest.raises(TrainingError, match=r"'classification/acuracy' is not measured; choose one of "
                                            r"classification/loss, classification/accuracy.*"
                                            r"\(did you mean 'classification/accuracy'\?\)"):
        train(cfg, show_progress=False, log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a single evaluation ran


# ---- data rows -----------------------------------------------------------------------------------------

def _task(chat_dir, tmp_path, rows, **kw):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_task(DataConfig(train=str(f), validation=str(f), **kw).tasks()[0], mintune.load_tokenizer(chat_dir))


def test_an_empty_instruction_response_is_refused(chat_dir, tmp_path):
    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say nothing", "output": "  "}]
    with pytest.raises(DataError, match=r"d\.jsonl line 2: field 'output' is empty"):
        _task(chat_dir, tmp_path, rows, kind="instruction")


@pytest.mark.parametrize("message,error", [
    ({"role": "assistant", "content": ["a", "list"]}, r"line 1: message 1: 'content' should be a string, got list"),
    ({"role": "assistant", "content": 7}, r"line 1: message 1: 'content' should be a string, got int"),
    ({"role": "assistant", "content": ""}, r"line 1: message 1 is an empty assistant answer"),
])
def test_chat_messages_are_checked(chat_dir, tmp_path, message, error):
    rows = [{"messages": [{"role": "user", "content": "hi"}, message]}]
    with pytest.raises(DataError, match=error):
        _task(chat_dir, tmp_path, rows, kind="chat")


def test_a_chat_role_the_template_does_not_know(chat_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(chat_dir, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())  # a template that renders any role it is given
    tc["chat_template"] = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "assistent", "content": "and?"}]}]
    with pytest.raises(DataError, match=r"d\.jsonl line 1: message 2: role 'assistent' is not one the chat "
                                        r"template of .* knows \(assistant, system, tool, user\)"):
        _task(d, tmp_path, rows, kind="chat")
    tok = mintune.load_tokenizer(d)
    with pytest.raises(ChatTemplateError, match="role 'bot'"):
        tok.apply_chat_template([{"role": "bot", "content": "x"}])


def test_a_prompt_template_with_a_positional_field_is_named(chat_dir, tmp_path):
    rows = [{"instruction": "Say hi", "output": "hi"}]
    with pytest.raises(DataError, match=r"data\.prompt_template 'Q: \{0\}': not a template of named fields"):
        _task(chat_dir, tmp_path, rows, kind="instruction", prompt_template="Q: {0}")


def test_a_byte_order_mark_is_not_part_of_the_first_field(chat_dir, tmp_path):
    (tmp_path / "d.csv").write_bytes("\ufefftext,label\ngood tram,positive\nsad tram,negative\n".encode())
    task = load_task(DataConfig(kind="classification", train=str(tmp_path / "d.csv"),
                                validation=str(tmp_path / "d.csv")).tasks()[0], mintune.load_tokenizer(chat_dir))
    assert task.labels == ["negative", "positive"]


def test_a_data_file_that_is_not_utf8_names_the_line(chat_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "na\xefve"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl line 2, column 13: not UTF-8 text"):
        load_task(DataConfig(train=str(f), validation=str(f)).tasks()[0], mintune.load_tokenizer(chat_dir))


# ---- config.json ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ("[1, 2]", r"config\.json: expected a JSON object of settings, got list"),
    ('{"model_type": "llama", "hidden_size": "48"}', r"config\.json: hidden_size should be a positive integer, "
                                                     r"got '48'"),
    ('{"model_type": "llama", "rms_norm_eps": "1e-6"}', r"config\.json: rms_norm_eps should be a number"),
    ('{"model_type": "llama", "num_hidden_layers": 0}', r"num_hidden_layers should be a positive integer, got 0"),
    ('{"model_type": 3}', r"model_type should be a string, got 3"),
])
def test_config_json_fields_are_checked_by_type(chat_dir, tmp_path, content, message):
    d = tmp_path / "model"
    shutil.copytree(chat_dir, d)
    if content.startswith("{"):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(json.loads(content))
        content = json.dumps(cfg)
    (d / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        mintune.load_model(d)


def test_a_tokenizer_larger_than_the_model_vocabulary(chat_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(chat_dir, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["additional_special_tokens"] = ["<extra_a>", "<extra_b>"]  # two ids the model has no row for
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    model, tok = mintune.load_model(d), mintune.load_tokenizer(d)
    with pytest.raises(ValueError, match=rf"has {model.cfg.vocab_size + 2} tokens, but the model .* has "
                                         rf"vocab_size = {model.cfg.vocab_size}"):
        mintune.generate(model, tok, "hi")


def test_a_damaged_adapter_config_is_named(chat_dir, tmp_path):
    fresh = mintune.load_model(chat_dir)
    mintune.apply_adapters(fresh, bottleneck=4)
    mintune.save_adapter(fresh, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "mintune_adapter.json").read_text())
    cfg["methods"]["adapters"]["bottlenek"] = cfg["methods"]["adapters"].pop("bottleneck")
    (tmp_path / "a" / "mintune_adapter.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mintune_adapter\.json: the settings of method 'adapters' do not fit it"):
        mintune.load_adapter(mintune.load_model(chat_dir), tmp_path / "a")
    (tmp_path / "a" / "mintune_adapter.json").write_text("[]")
    with pytest.raises(ValueError, match=r"mintune_adapter\.json: expected a JSON object, got list"):
        mintune.load_adapter(mintune.load_model(chat_dir), tmp_path / "a")


# ---- generation and evaluation arguments ---------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1, temperature=1.0), r"top_k must be an integer >= 0"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens=-1, use_cache=False), r"max_new_tokens must be an integer >= 0, got -1"),
    (dict(temperature=float("nan")), r"temperature must be a number >= 0"),
])
def test_generation_arguments_are_checked(chat, kw, message):
    model, tok = chat
    with pytest.raises(ValueError, match=message):
        mintune.generate(model, tok, "hi", **kw)


def test_a_prompt_longer_than_rotary_positions_warns(chat):
    model, tok = chat
    ids = torch.randint(5, 50, (1, model.cfg.max_position_embeddings + 4))
    model.warned_length = False
    with pytest.warns(UserWarning, match=r"longer than this model's max_position_embeddings = 256"):
        with torch.no_grad():
            model(ids)


def test_a_sequence_longer_than_learned_positions_is_refused(saved):
    model = mintune.load_model(saved("gpt2"))
    with pytest.raises(ValueError, match=r"a sequence of 65 positions is longer than .* max_position_embeddings = 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_evaluation_settings_and_one_token_texts(chat, chat_dir, tmp_path, capsys):
    model, _ = chat
    with pytest.raises(ValueError, match=r"max_length must be at least 2"):
        token_nll(model, [[5, 6, 7]], max_length=1)
    with pytest.raises(ValueError, match=r"none of the 2 texts has two tokens or more"):
        token_nll(model, [[5], [6]])
    (tmp_path / "one.jsonl").write_text('{"text": ""}\n{"text": ""}\n')  # the BOS alone: one token each
    assert evaluate_mod.main(["--model", str(chat_dir), "--data", str(tmp_path / "one.jsonl")]) == 2
    assert "one.jsonl: none of the 2 texts has two tokens or more" in capsys.readouterr().err
    assert evaluate_mod.main(["--model", str(chat_dir), "--data", str(tmp_path / "one.jsonl"),
                              "--max-length", "1"]) == 2
    assert "max_length must be at least 2" in capsys.readouterr().err


# ---- devices -------------------------------------------------------------------------------------------

def test_an_unknown_or_missing_device_is_refused_before_any_weight_is_read(chat_dir, monkeypatch):
    def no_reading(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(hf, "_read_into", no_reading)
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; use cpu, cuda, cuda:N or auto"):
        mintune.load_model(chat_dir, device="gpu")
    with pytest.raises(ValueError, match=r"device 'mps': mintune runs on cpu or cuda"):
        mintune.load_model(chat_dir, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda': no CUDA GPU is available"):
            mintune.load_model(chat_dir, device="cuda")
