"""python -m lmforge.generate: streaming that prints whole characters, stop strings, batch files,
chat turns, free-text options, and the message for a reward-model checkpoint."""

from __future__ import annotations

import io
import json

import pytest
from feedback_fixtures import ckpts  # noqa: F401  (session fixture)

from lmforge.cli import compose_cli, run_cli
from lmforge.errors import UsageError
from lmforge.generate import main, run_chat
from lmforge.inference.language_model import LanguageModel, SamplingSettings, TextStream
from lmforge.training.checkpoint import CheckpointError

TEMPLATE = "User: {prompt}\nAssistant:"


@pytest.fixture(scope="module")
def lm(ckpts):  # noqa: F811
    return LanguageModel(ckpts["lm"])


def test_stream_prints_whole_characters_of_byte_tokens(lm):
    text = "naïve 🙂 日本語 ok"
    ids = lm.tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # several tokens are single bytes of one character
    chunks: list[str] = []
    stream = TextStream(lm.tokenizer, (), chunks.append)
    for t in ids:
        stream.push(t)
    assert stream.finish() == text
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    assert len(chunks) > 3


def test_stream_stops_at_a_stop_string_without_printing_it(lm):
    tok = lm.tokenizer
    chunks: list[str] = []
    stream = TextStream(tok, ("\nUser:",), chunks.append)
    stopped = [stream.push(t) for t in tok.encode(" 5\nUser: what next")]
    assert any(stopped) and stream.finish() == " 5" and "".join(chunks) == " 5"
    # a tail that only starts like a stop string is printed once the response ends
    chunks.clear()
    stream = TextStream(tok, ("\nUser:",), chunks.append)
    for t in tok.encode(" 5\nUs"):
        assert not stream.push(t)
    assert "".join(chunks) == " 5" and stream.finish() == " 5\nUs" and "".join(chunks) == " 5\nUs"


def test_single_prompt_streams_the_same_text_as_batch_sampling(lm, ckpts, capsys):  # noqa: F811
    args = [f"ckpt={ckpts['lm']}", "prompt=What is 2 + 3?", "max_new_tokens=12", "seed=3", "stop=[]"]
    streamed = main(args)
    out_streamed = capsys.readouterr().out
    plain = main([*args, "stream=false"])
    out_plain = capsys.readouterr().out
    assert out_streamed == out_plain == streamed.text + "\n"
    assert streamed.text == plain.text and streamed.n_tokens >= 1
    chunks: list[str] = []
    from lmforge.inference.language_model import make_generator

    lm.stream(
        TEMPLATE.format(prompt="What is 2 + 3?"), SamplingSettings(12, 0.8, stop=()), chunks.append, make_generator(3)
    )
    assert "".join(chunks) == streamed.text and (len(chunks) > 1 or streamed.n_tokens <= 1)


def test_batch_mode_over_txt_and_jsonl_files(ckpts, tmp_path):  # noqa: F811
    txt = tmp_path / "prompts.txt"
    txt.write_text("What is 2 + 3?\n\nReverse the word cat.\n")
    out = tmp_path / "out.jsonl"
    assert (
        main([f"ckpt={ckpts['lm']}", f"prompts={txt}", f"out={out}", "max_new_tokens=6", "n=2", "temperature=0"]) == 4
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 2 + 3?"] * 2 + ["Reverse the word cat."] * 2
    assert rows[0]["response"] == rows[1]["response"]  # greedy
    assert {r["finish_reason"] for r in rows} <= {"eos", "stop", "length"}
    assert rows[0]["template"] == TEMPLATE and rows[0]["stage"] == "pretrain" and len(rows[0]["ckpt_sha256"]) == 64
    jl = tmp_path / "prompts.jsonl"
    jl.write_text(json.dumps({"question": "Name a color.", "id": 7}) + "\n" + json.dumps("Say hi.") + "\n")
    main(
        [
            f"ckpt={ckpts['lm']}",
            f"prompts={jl}",
            "prompt_field=question",
            f"out={out}",
            "max_new_tokens=4",
            "template=Q: {prompt}\\nA:",
        ]
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["prompt"] == "Name a color." and rows[0]["id"] == 7 and rows[1]["prompt"] == "Say hi."
    assert rows[0]["template"] == "Q: {prompt}\nA:"
    main([f"ckpt={ckpts['lm']}", "prompts=synthetic:3", f"out={out}", "max_new_tokens=2"])
    assert len(out.read_text().splitlines()) == 3


def test_chat_concatenates_the_dialog(lm, monkeypatch, capsys):
    contexts = []
    real = lm.stream

    def spy(text, *a, **k):
        contexts.append(text)
        return real(text, *a, **k)

    monkeypatch.setattr(lm, "stream", spy)
    from lmforge.generate import GenerateConfig

    lines = iter(["hello", "and again", "/reset", "fresh start"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    turns = run_chat(lm, GenerateConfig(ckpt="x", chat=True, max_new_tokens=5), TEMPLATE, read)
    assert [t[0] for t in turns] == ["hello", "and again", "fresh start"]
    first = TEMPLATE.format(prompt="hello") + turns[0][1] + "\n"
    assert contexts[0] == TEMPLATE.format(prompt="hello")
    assert contexts[1] == first + TEMPLATE.format(prompt="and again")
    assert contexts[2] == TEMPLATE.format(prompt="fresh start")
    out = capsys.readouterr().out
    assert out.count("model>") == 3 and "(dialog cleared)" in out


def test_chat_mode_from_the_command_line(ckpts, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\n/quit\n"))
    turns = main([f"ckpt={ckpts['lm']}", "chat=true", "max_new_tokens=4"])
    assert len(turns) == 1 and "model>" in capsys.readouterr().out


def test_reward_checkpoint_is_refused_with_a_message(ckpts, capsys):  # noqa: F811
    with pytest.raises(CheckpointError, match="language-model head"):
        main([f"ckpt={ckpts['reward']}", "prompt=hi"])
    assert run_cli(main, [f"ckpt={ckpts['reward']}", "prompt=hi"], "doc") == 2
    err = capsys.readouterr().err
    assert "'reward' checkpoint" in err and "scalar head" in err


def test_command_line_mistakes(ckpts, capsys):  # noqa: F811
    ck = f"ckpt={ckpts['lm']}"
    for argv, fragment in (
        ([ck], "exactly one of"),
        ([ck, "prompt=x", "chat=true"], "exactly one of"),
        ([ck, "prompt=x", "temperature=-1"], "temperature"),
        ([ck, "prompt=x", "top_p=1.5"], "top_p"),
        (["prompt=x"], "ckpt="),
    ):
        with pytest.raises(UsageError, match=fragment):
            main(argv)
    assert run_cli(main, [ck, "prompt=x", "temprature=1"], "doc") == 2
    assert "temprature" in capsys.readouterr().err
    assert run_cli(main, ["--help"], "the doc") == 0 and "the doc" in capsys.readouterr().out


def test_free_text_options_are_taken_verbatim():
    cfg = compose_cli(
        "generate",
        ["ckpt=x", 'prompt=Hi, there: "quoted" {a} ${oops}', "template='Q: {prompt}'"],
        schema="generate_schema",
        free_text=("prompt", "template"),
    )
    assert cfg.prompt == 'Hi, there: "quoted" {a} ${oops}'
    assert cfg.template == "Q: {prompt}"


def test_checkpoint_hash_of_a_model_folder(tmp_path):
    """An HF (or `convert import`) model folder is hashed by its files' names and contents."""
    from lmforge.inference.language_model import file_sha256

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00\x01")
    first = file_sha256(tmp_path / "m")
    assert first == file_sha256(tmp_path / "m") and len(first) == 64
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00\x02")
    assert file_sha256(tmp_path / "m") != first
    (tmp_path / "f.ckpt").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f.ckpt") == __import__("hashlib").sha256(b"abc").hexdigest()
