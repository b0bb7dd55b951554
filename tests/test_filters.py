"""The filter language (search_ui.filters): what it accepts, the canonical SQL it sends LanceDB,
and one sentence for everything else -- function calls above all: `repeat(id, 100000000) = 'x'`
made LanceDB allocate 100 GB and abort the whole process (issue 25)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from indexer.errors import UserError
from search_ui import filters as F
from search_ui.filters import parse_filter

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("label", pa.string()), ("split", pa.string()),
                    ("loss", pa.float32()), ("embedding", pa.list_(pa.float32(), 4)),
                    ("predicted_loss", pa.float32()), ("blue_circles", pa.bool_()), ("odd name", pa.int64()),
                    ("tags", pa.list_(pa.string()))])


@pytest.mark.parametrize("text, sql", [
    ("split = 'test' AND loss > 1", "`split` = 'test' AND `loss` > 1"),
    ("label IN ('a', 'it''s')", "`label` IN ('a', 'it''s')"),
    ("label not in ('a')", "`label` NOT IN ('a')"),
    ("NOT blue_circles OR blue_circles IS NULL", "NOT `blue_circles` OR `blue_circles` IS NULL"),
    ("loss BETWEEN 0.5 AND 2e0", "`loss` BETWEEN 0.5 AND 2.0"),
    ("loss NOT BETWEEN -1 AND 1", "`loss` NOT BETWEEN -1 AND 1"),
    ("id LIKE 's0%' AND id NOT LIKE '%9'", "`id` LIKE 's0%' AND `id` NOT LIKE '%9'"),
    ("`odd name` <> 3", "`odd name` != 3"),
    ('"split" = \'x;y\'', "`split` = 'x;y'"),
    ("loss * 2 > predicted_loss + 0.1", "`loss` * 2 > `predicted_loss` + 0.1"),
    ("loss - (predicted_loss - 1) * -2 > - -1", "`loss` - (`predicted_loss` - 1) * -2 > - -1"),
    ("NOT (label = 'a' OR NOT blue_circles)", "NOT (`label` = 'a' OR NOT `blue_circles`)"),
    ("(NOT blue_circles) = TRUE", "(NOT `blue_circles`) = TRUE"),
    ("blue_circles IS NOT TRUE", "`blue_circles` IS NOT TRUE"),
    ("(label = 'a' OR label = 'b') AND split != 'train'",
     "(`label` = 'a' OR `label` = 'b') AND `split` != 'train'"),
    ("((((loss > 1))))", "`loss` > 1"),
    ("   ", None),
])
def test_accepted_filters_become_canonical_sql(text, sql):
    got = parse_filter(text, SCHEMA)
    assert (got.sql if got else None) == sql


@pytest.mark.parametrize("text, words", [
    ("repeat(id, 100000000) = 'x'", "calls the function repeat"),
    ("regexp_match(id, '(a+)+$') IS NOT NULL", "calls the function regexp_match"),
    ("length(id) > 1", "calls the function length"),
    ("CAST(loss AS int) > 1", "calls the function CAST"),
    ("id IN (SELECT id FROM samples)", "expected a value"),
    ("(SELECT 1) = 1", "SELECT is SQL outside the filter language"),
    ("CASE WHEN loss > 1 THEN true END", "CASE is SQL outside"),
    ("split = 'train'; DROP TABLE samples", "a `;`"),
    ("loss > 1 /* comment */", "expected a column or a value"),
    ("no_such > 1", "no column 'no_such'"),
    ("lable = 'cat'", "did you mean label"),
    ("split = test", "single quotes: 'test'"),
    ("loss = 'x'", "compares `loss` (a number) with 'x' (a string)"),
    ("label > 3", "compares `label` (a string) with 3 (a number)"),
    ("loss LIKE '1%'", "LIKE needs a string"),
    ("loss", "is a number, not a condition"),
    ("embedding IS NULL", "holds vectors"),
    ("tags IS NULL", "holds values of type list"),
    ("loss > 1e999", "not finite"),
    ("loss > 99999999999999999999", "larger than a 64-bit integer"),
    ("(" * (F.MAX_DEPTH + 1) + "loss > 1" + ")" * (F.MAX_DEPTH + 1), f"nests more than {F.MAX_DEPTH}"),
    ("NOT " * (F.MAX_DEPTH + 1) + "blue_circles", f"nests more than {F.MAX_DEPTH}"),
    ("NOT (" * F.MAX_DEPTH + "blue_circles" + ")" * F.MAX_DEPTH, f"nests more than {F.MAX_DEPTH}"),
    (" OR ".join(["loss > 1"] * (F.MAX_NODES // 2)), f"more than {F.MAX_NODES} operations"),
    ("id IN (" + ", ".join(f"'s{i}'" for i in range(F.MAX_IN_ITEMS + 1)) + ")", f"more than {F.MAX_IN_ITEMS} values"),
    ("id = '" + "x" * (F.MAX_STRING_CHARS + 1) + "'", "characters long"),
    ("id LIKE '" + "%a" * (F.MAX_LIKE_WILDCARDS + 1) + "'", "wildcards"),
    ("id LIKE '" + "a" * (F.MAX_LIKE_CHARS + 1) + "'", "LIKE pattern is"),
    ("loss > 1 AND " * 2000 + "loss > 1", "characters long"),
    ("label = 'a", "a string without its closing quote"),
    ("loss ! 1", "the character '!'"),
    ("loss >", "at the end"),
    ("AND loss > 1", "AND at position 1"),
    ("label = 'x' \x00", "NUL"),
    ("", None),
])
def test_refused_filters_are_one_sentence_naming_what(text, words):
    if words is None:
        assert parse_filter(text, SCHEMA) is None
        return
    with pytest.raises(UserError) as e:
        parse_filter(text, SCHEMA)
    msg = str(e.value)
    assert words in msg, msg
    assert msg.startswith("--where ") and "\n" not in msg and msg.rstrip(".").count(". ") == 0, msg


def test_a_checked_filter_runs_on_lancedb_as_written(tmp_path):
    """The canonical SQL means on LanceDB what the filter says: quotes, odd names, backslashes, newlines."""
    import lancedb

    t = lancedb.connect(tmp_path).create_table("t", pa.table({
        "id": ["a", "b\\", "c'd", "e\nf", "g"], "loss": [1.0, 2.0, 3.0, None, 0.5],
        "odd name": [1, 2, 3, 4, 5], "blue_circles": [True, False, True, None, False]}))
    ds = t.to_lance()

    def ids(text):
        return sorted(ds.to_table(filter=parse_filter(text, t.schema).sql).column("id").to_pylist())

    assert ids("id = 'b\\'") == ["b\\"]
    assert ids("id IN ('c''d', 'e\nf')") == ["c'd", "e\nf"]
    assert ids("`odd name` >= 4 OR loss IS NULL") == ["e\nf", "g"]
    assert ids("blue_circles AND loss > 1") == ["c'd"]
    assert ids("id LIKE 'c%'") == ["c'd"]
    # precedence survives the re-emitted SQL (which parenthesises only where needed)
    assert ids("NOT (loss > 1 OR id = 'g')") == ["a"]
    assert ids("(id = 'a' OR id = 'g') AND loss < 1") == ["g"]
    assert ids("loss - (1 - loss) > 4") == ["c'd"]
    assert ids("NOT blue_circles AND loss > 0") == ["b\\", "g"]
    assert len(F.matching_row_ids(ds, parse_filter("loss BETWEEN 0.5 AND 2", t.schema))) == 3
    with pytest.raises(UserError, match="took more than 0 s"):
        F.matching_row_ids(ds, parse_filter("loss > 0", t.schema), seconds=0)
