"""`zoo shards make-builtin`: bad counts are one-line errors, not empty or exploded datasets."""

from __future__ import annotations

import pytest

from zoo.cli import main


@pytest.mark.parametrize("args, says", [
    (["--n", "0"], "--n 0: give a positive number of samples, e.g. --n 1000"),
    (["--n", "-5"], "--n -5: give a positive number of samples"),
    (["--maxcount", "0"], "--maxcount 0: give a positive number of samples per shard"),
    (["--size", "4"], "size must be an integer >= 8 pixels, got 4; fix --seed or --size"),
    (["--seed", "-1"], "seed must be an integer >= 0, got -1; fix --seed or --size"),
])
def test_bad_values_are_one_line_errors_and_write_nothing(tmp_path, capsys, args, says):
    out = tmp_path / "shards"
    assert main(["shards", "make-builtin", "fractals", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and err.startswith("zoo: error: ") and "\n" not in err
    assert not out.exists()


def test_a_positive_n_still_writes_it(tmp_path, capsys):
    assert main(["shards", "make-builtin", "fractals", "--n", "3", "--maxcount", "2", "--out", str(tmp_path / "s")]) == 0
    assert "wrote 3 fractals samples in 2 shard(s)" in capsys.readouterr().out
