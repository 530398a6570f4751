"""Bad-input sweep of privacy (tests/sweep.py): every numeric flag of privacy.hot_pate at nan, 0, -1 and huge.
One line and exit 2 naming the flag and value, or accepted; nothing trains. The family reads no files (its
corpus is generated, the digits are scikit-learn's), so it has no reader to sweep."""

import pytest

from tests.sweep import check_flag, flag_cases


@pytest.mark.parametrize("module, flag, kind, value", flag_cases(["privacy.hot_pate.run"]))
def test_numeric_flag(module, flag, kind, value, tmp_path, capsys):
    check_flag(module, flag, kind, value, tmp_path, capsys)
