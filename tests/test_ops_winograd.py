"""The Winograd transform matrices: one set of numbers, in winograd.py and in the extension's winograd.cc, and
those numbers are a Winograd F(m, 3) (Lavin & Gray 2016, eq. 1-2: ``y = A^T [(G g) . (B^T d)]`` equals the
correlation of ``d`` with ``g``, checked against numpy's ``correlate``).

The C++ constants are read from the source, so this runs without a compiler and fails on a one-entry edit of
either copy before any convolution is computed.
"""

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from resnet_jax.ops import winograd

SOURCE = Path(winograd.__file__).parent / "onednn" / "csrc" / "winograd.cc"


def number(text: str) -> float:
    """A C++ float literal or a quotient of two ("0.5f", "-1.f / 6"), evaluated without eval."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return value(node.left) / value(node.right)
        raise ValueError(f"not a constant: {text!r}")
    return value(ast.parse(re.sub(r"(?<=[\d.])f\b", "", text).strip(), mode="eval").body)


def cpp_tables(text: str) -> dict[int, dict[str, np.ndarray]]:
    """{m: {"BT": ..., "G": ..., "AT": ..., "A": ..., "GT": ...}} from ``template <> struct Tables<m>``."""
    tables = {}
    for m, body in re.findall(r"struct Tables<(\d+)>\s*{(.*?)\n};", text, re.S):
        found = {}
        for name, rows, cols, values in re.findall(
                r"static constexpr float (\w+)\[(\d+)\]\[(\d+)\] = {(.*?)};", body, re.S):
            entries = [number(v) for v in re.sub(r"[{}\s]", " ", values).replace(" ", "").split(",") if v]
            found[name] = np.array(entries).reshape(int(rows), int(cols))
        tables[int(m)] = found
    return tables


@pytest.mark.parametrize("m", [2, 4])
def test_python_and_cpp_hold_the_same_matrices(m):
    cpp = cpp_tables(SOURCE.read_text())[m]
    assert set(cpp) == {"BT", "G", "AT", "A", "GT"}
    for name, table in winograd.TABLES[m].items():
        np.testing.assert_allclose(cpp[name], np.asarray(table, np.float64), rtol=1e-7, err_msg=f"F({m},3) {name}")
    # the C++ also keeps the transposes the kernel gradient uses; they must be transposes of the same numbers
    np.testing.assert_array_equal(cpp["A"], cpp["AT"].T)
    np.testing.assert_array_equal(cpp["GT"], cpp["G"].T)


@pytest.mark.parametrize("m", [2, 4])
def test_the_matrices_compute_a_correlation(m):
    """1-D F(m, 3): ``A^T [(G g) . (B^T d)]`` equals numpy's correlation of the m + 2 inputs with the 3 taps;
    the 2-D transform nests it, so this pins every entry."""
    bt, g, at = (np.asarray(winograd.TABLES[m][k], np.float64) for k in ("BT", "G", "AT"))
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, taps = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), np.correlate(d, taps, "valid"), rtol=1e-12,
                                   atol=1e-12)


def test_the_parser_reads_a_changed_entry():
    """Positive control: a one-entry change in the C++ text changes what the comparison reads."""
    text = SOURCE.read_text()
    row = "{0, 1, -1, 2, -2, 0}"  # F(4,3)'s A^T row 1
    assert text.count(row) == 1 and cpp_tables(text)[4]["AT"][1, 3] == 2.0
    assert cpp_tables(text.replace(row, "{0, 1, -1, 3, -2, 0}"))[4]["AT"][1, 3] == 3.0
    assert number("-1.f / 6") == pytest.approx(-1 / 6) and number("0.25f") == 0.25 and number("4") == 4.0
