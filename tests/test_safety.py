"""Safety of a database folder: what a corrupt or hostile folder can do (nothing), what `serve`
hands out (the indexed images only), and processes running at once (no row twice, no lost files)."""

from __future__ import annotations

import pytest

from indexer.errors import UserError
from search_ui.cli import main
from tests.fakes import make_db


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety")
    return folder, make_db(folder, n=40)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b""])
def test_a_corrupt_meta_json_is_one_sentence_naming_the_file(tmp_path, small_db, capsys, content):
    import shutil

    shutil.copytree(small_db[1].path, tmp_path / "db")
    (tmp_path / "db" / "meta.json").write_bytes(content)
    from indexer.store import Database

    with pytest.raises(UserError, match=r"meta\.json is not a JSON object .*restore it"):
        Database(tmp_path / "db").read_meta()
    assert main(["search", "a circle", "--db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "meta.json" in err and "Traceback" not in err
