"""The CLI's query commands: `--json` is one valid JSON document on stdout and nothing else."""

import json
import os
import subprocess
import sys

import pytest

from tests.fakes import make_db

FIELDS = ["id", "image", "label", "split", "loss", "predicted_loss", "predicted_loss_std", "similarity", "score"]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return make_db(tmp_path_factory.mktemp("cli"), n=40)


def cli(*args, ok=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "search_ui.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_search_json(db):
    p = cli("search", "a blue circle", "--db", str(db.path), "-k", "5", "--json",
            "--negative", "a red square:0.3", "--also", "blue:0.5", "--where", "split = 'train'")
    results = json.loads(p.stdout)  # the whole of stdout is one document
    assert len(results) == 5
    for r in results:
        assert list(r)[: len(FIELDS)] == FIELDS
        assert set(r) == set(FIELDS) | {"color"}
        assert r["split"] == "train" and isinstance(r["score"], float)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


def test_similar_json_and_text_output(db):
    results = json.loads(cli("similar", "s00004", "--db", str(db.path), "-k", "3", "--json").stdout)
    assert len(results) == 3 and "s00004" not in [r["id"] for r in results]

def test_text_output_one_line_per_result(db, capsys):
    from search_ui.cli import main

    assert main(["similar", "s00004", "--db", str(db.path), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("score" in line for line in lines)


def test_select_and_export(db, tmp_path, capsys):
    # In-process (main()) to spare the 2-core CI a torch import per call; the JSON contract is the same.
    from search_ui.cli import main

    def run(*args):
        assert main(list(args)) == 0
        return capsys.readouterr().out

    run("select", "add", "hard", "--db", str(db.path), "--query", "a blue circle", "-k", "4")
    assert json.loads(run("select", "list", "--db", str(db.path), "--json")) == {"hard": 4}
    ids = json.loads(run("select", "show", "hard", "--db", str(db.path), "--json"))
    assert len(ids) == 4
    out = tmp_path / "hard.csv"
    assert run("export", "--db", str(db.path), "--selection", "hard", "--out", str(out)).strip() == str(out.resolve())
    assert out.read_text().count("\n") == 5
    assert main(["select", "add", "hard", "--db", str(db.path)]) == 2
    assert "exactly one of --ids" in capsys.readouterr().err


def test_bad_input_is_one_line_on_stderr_and_nothing_on_stdout(db):
    p = cli("search", "a circle", "--db", str(db.path), "--where", "nope >", "--json", ok=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1].startswith("llm2loss search: --where")
    p = cli("similar", "no-such-id", "--db", str(db.path), "--json", ok=False)
    assert p.returncode == 2 and p.stdout == "" and "neither a sample id" in p.stderr
