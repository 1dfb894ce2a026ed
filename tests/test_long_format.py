"""Long-format CSV (timestamp, [device,] channel, value) through the daemon's assembler (issue 8 part 5,
issue 9 item 2): the same rows as the wide file when every channel is there, the documented gap policy
when not, and the line and column of anything unusable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sensord.config import AssemblyConfig, DataConfig
from sensord.dataio import load_csv, load_recordings
from sensord.errors import DataError


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_complete_long_file_gives_the_wide_files_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ts = [1_700_000_000.0 + i for i in range(40)]
    vals = rng.normal(size=(40, 3)).astype(np.float32)
    wide = ["timestamp,a,b,c", *(f"{t!r},{','.join(repr(float(v)) for v in row)}"
                                 for t, row in zip(ts, vals, strict=True))]
    long = ["timestamp,channel,value"]
    for t, row in zip(ts, vals, strict=True):
        long += [f"{t!r},{ch},{float(v)!r}" for ch, v in reversed(list(zip("abc", row, strict=True)))]
    w = load_csv(write(tmp_path / "wide.csv", wide))
    lg = load_csv(write(tmp_path / "long.csv", long))
    assert lg.channels == ("c", "b", "a")  # order of appearance, unless data.channels / the model says
    lg = load_csv(tmp_path / "long.csv", channels=("a", "b", "c"))
    assert lg.timestamps.tolist() == w.timestamps.tolist()
    np.testing.assert_array_equal(lg.values, w.values)


def test_gaps_follow_the_assembly_policy_and_labels_are_a_channel(tmp_path: Path) -> None:
    """a is held up to max_staleness; a tick without a fresh a has no row; a late value is dropped."""
    lines = ["time,device,channel,value",
             "10,p,a,1", "10,p,b,2", "10,p,anomaly,0",
             "11,p,b,3",                       # a held (1 s old)
             "12,p,b,4", "12,p,anomaly,1",     # a held (2 s old)
             "14,p,b,5",                       # a 4 s old > 3: tick 14 (and 13) have no row
             "15,p,a,6", "15,p,b,7",
             "14.5,p,a,9",                     # sorted into time order: folded in before 15
             "16,p,a,8", "16,p,b,8"]
    s = load_csv(write(tmp_path / "l.csv", lines), assembly=AssemblyConfig(max_staleness_seconds=3.0),
                 period=1.0, require_labels=True)
    assert s.channels == ("a", "b")
    assert s.timestamps.tolist() == [10.0, 11.0, 12.0, 13.0, 15.0]
    assert s.values.tolist() == [[1, 2], [1, 3], [1, 4], [1, 4], [6, 7]]
    assert s.labels is not None and s.labels.tolist() == [0, 0, 1, 1, 1]  # the label is held like a channel


def test_lines_in_file_order_like_arrivals_unless_the_file_is_not_in_time_order(tmp_path: Path) -> None:
    """A value that arrives after its tick was decided is dropped, offline as live; a file exported
    channel by channel (most values would be late) is read in time order instead."""
    arrivals = ["timestamp,channel,value", "1,a,1", "1,b,1", "2,a,2", "2,b,2", "3,a,3", "3,b,3",
                "1.5,a,99", "4,a,4", "4,b,4"]
    s = load_csv(write(tmp_path / "arrivals.csv", arrivals), period=1.0)
    assert s.values[:, 0].tolist() == [1, 2, 3, 4]  # 99 came too late for tick 2
    grouped = ["timestamp,channel,value"] + [f"{t},a,{t}" for t in range(1, 30)] + [f"{t},b,{-t}" for t in range(1, 30)]
    g = load_csv(write(tmp_path / "grouped.csv", grouped), period=1.0)
    assert g.timestamps.tolist() == [float(t) for t in range(1, 30)]
    assert g.values[:, 1].tolist() == [-t for t in range(1, 30)]


def test_the_clock_is_the_configs_else_the_models_else_the_files(tmp_path: Path) -> None:
    lines = ["timestamp,channel,value"] + [f"{t},{ch},{t}" for t in range(0, 20, 2) for ch in "ab"]
    path = write(tmp_path / "l.csv", lines)
    assert np.diff(load_csv(path).timestamps).tolist() == [2.0] * 9  # measured: the median step
    assert len(load_csv(path, period=1.0, assembly=AssemblyConfig(max_staleness_seconds=5.0))) == 19
    assert len(load_csv(path, period=4.0, assembly=AssemblyConfig(sample_period_seconds=2.0))) == 10


def test_devices_are_separate_series_and_load_csv_wants_one(tmp_path: Path) -> None:
    lines = ["timestamp,device,channel,value"] + [f"{t},{d},x,{t}" for t in range(5) for d in ("p1", "p2")]
    path = write(tmp_path / "l.csv", lines)
    found = load_recordings(path)
    assert [s.path.rsplit("#", 1)[1] for s in found] == ["p1", "p2"] and all(len(s) == 5 for s in found)
    with pytest.raises(DataError, match=r"holds 2 devices \(p1, p2\)"):
        load_csv(path)


@pytest.mark.parametrize(("line", "error"), [
    ("2,a,x", r"l\.csv:3: column 'value': not a number: 'x'"),
    ("2,a,nan", r"l\.csv:3: column 'value': not a finite number"),
    ("yesterday,a,1", r"l\.csv:3: column 'timestamp': not a timestamp: 'yesterday'"),
    ("2,,1", r"l\.csv:3: column 'channel': empty channel name"),
    ("2,a", r"l\.csv:3: expected 3 fields, got 2"),
])
def test_unusable_lines_name_line_and_column(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(DataError, match=error):
        load_csv(write(tmp_path / "l.csv", ["timestamp,channel,value", "1,a,1", line]))


def test_a_channel_the_model_needs_but_the_file_lacks_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "l.csv", ["timestamp,channel,value", "1,a,1", "2,a,2"])
    with pytest.raises(DataError, match=r"channel\(s\) \['b'\] never appear in column 'channel'"):
        load_csv(path, DataConfig(channels=["a", "b"]))
    with pytest.raises(DataError, match="no line of channel 'anomaly'"):
        load_csv(path, require_labels=True)


# -- wide files with empty cells: the same rule (sensord.assembly.Assembler) ---------------------------------

WIDE_WITH_GAPS = ["timestamp,a,b,anomaly",
                  "10,1,2,0",
                  "11,,3,",        # a held (1 s old), the label too
                  "12,,4,1",       # a held (2 s old)
                  "13,,,",         # nothing new: a and b held
                  "14,,5,",        # a 4 s old > 3: no row at 14 (the series splits)
                  "15,6,7,",
                  "16,8,8,0"]


def test_a_wide_file_with_empty_cells_follows_the_long_layouts_policy(tmp_path: Path) -> None:
    assembly = AssemblyConfig(max_staleness_seconds=3.0)
    wide = load_csv(write(tmp_path / "w.csv", WIDE_WITH_GAPS), assembly=assembly, period=1.0, require_labels=True)
    assert wide.channels == ("a", "b")
    assert wide.timestamps.tolist() == [10.0, 11.0, 12.0, 13.0, 15.0, 16.0]
    assert wide.values.tolist() == [[1, 2], [1, 3], [1, 4], [1, 4], [6, 7], [8, 8]]
    assert wide.labels is not None and wide.labels.tolist() == [0, 0, 1, 1, 1, 0]
    # exactly what the same values give as a long file: one rule, in one place
    long = ["timestamp,channel,value"]
    for row in WIDE_WITH_GAPS[1:]:
        t, *cells = row.split(",")
        long += [f"{t},{ch},{v}" for ch, v in zip(("a", "b", "anomaly"), cells, strict=True) if v]
    lg = load_csv(write(tmp_path / "l.csv", long), channels=("a", "b"), assembly=assembly, period=1.0,
                  require_labels=True)
    assert lg.timestamps.tolist() == wide.timestamps.tolist() and lg.values.tolist() == wide.values.tolist()
    assert lg.labels is not None and lg.labels.tolist() == wide.labels.tolist()


def test_a_wide_file_with_empty_cells_is_resampled_to_the_sampling_period(tmp_path: Path) -> None:
    """Rows on the grid k * period: the model's (or assembly.sample_period_seconds), else the file's median step."""
    lines = ["timestamp,a,b", "0,1,1", "0.5,2,", "1,3,3", "2,,4", "2.5,5,5", "3,6,6"]
    s = load_csv(write(tmp_path / "w.csv", lines), assembly=AssemblyConfig(max_staleness_seconds=2.0), period=1.0)
    assert s.timestamps.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert s.values.tolist() == [[1, 1], [3, 3], [3, 4], [6, 6]]
    full = load_csv(write(tmp_path / "full.csv", ["timestamp,a,b", "0,1,1", "0.5,2,2", "1,3,3"]), period=1.0)
    assert full.timestamps.tolist() == [0.0, 0.5, 1.0]  # (no empty cell: the rows as written, as before)


@pytest.mark.parametrize(("line", "error"), [
    ("12,x,4", r"w\.csv:4: column 'a': not a number: 'x'"),
    ("12,nan,4", r"w\.csv:4: column 'a': not a finite number: 'nan'"),
    ("12,,oops", r"w\.csv:4: column 'b': not a number: 'oops'"),
    ("twelve,,4", r"w\.csv:4: column 'timestamp': not a timestamp"),
])
def test_unusable_cells_of_a_wide_file_with_gaps_name_line_and_column(tmp_path: Path, line: str, error: str) -> None:
    with pytest.raises(DataError, match=error):
        load_csv(write(tmp_path / "w.csv", ["timestamp,a,b", "10,1,2", "11,,3", line]), period=1.0)


def test_a_wide_file_whose_gaps_leave_no_row_says_so(tmp_path: Path) -> None:
    lines = ["timestamp,a,b", "10,1,", "20,,2", "30,3,"]
    with pytest.raises(DataError, match=r"w\.csv: no complete row on the 1 s clock.*max_staleness_seconds"):
        load_csv(write(tmp_path / "w.csv", lines), assembly=AssemblyConfig(max_staleness_seconds=3.0), period=1.0)
