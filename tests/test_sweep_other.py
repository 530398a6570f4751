"""Bad-input sweep of the vision, analysis and classification scripts (tests/sweep.py): every numeric flag of
phis, kdexplainer, disco, scaling_laws and sinkhorn.classify at nan, 0, -1 and huge. One line and exit 2 naming
the flag and value, or accepted; nothing trains. These scripts read no user files (scikit-learn's digits and
generated data), so they have no reader to sweep."""

import pytest

from tests.sweep import check_flag, flag_cases

OTHER = ["methods.phis.run", "methods.kdexplainer.run", "methods.disco.run", "methods.scaling_laws.run",
         "methods.sinkhorn.classify"]  # fmt: skip


@pytest.mark.parametrize("module, flag, kind, value", flag_cases(OTHER))
def test_numeric_flag(module, flag, kind, value, tmp_path, capsys):
    check_flag(module, flag, kind, value, tmp_path, capsys)
