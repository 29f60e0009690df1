"""Collect every ``corpus/regressions/*.repro`` as test items.

Each file yields one item per replay its ``# expect:`` line asks for (with its
fault and without, see :func:`mmufuzz.fuzz.corpus.regression_checks`); a failing item
reports the replayed reproducer, not a Python traceback.
"""

from __future__ import annotations

import pytest

from mmufuzz.fuzz.corpus import check_regression, regression_checks
from mmufuzz.fuzz.encoding import ReproError, load_reproducer


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".repro" and file_path.parent.name == "regressions":
        return RegressionFile.from_parent(parent, path=file_path)
    return None


class RegressionFile(pytest.File):
    def collect(self):
        try:
            repro = load_reproducer(self.path)
            checks = regression_checks(repro, str(self.path))
        except ReproError as error:
            raise self.CollectError(str(error)) from None
        for check in checks:
            yield RegressionItem.from_parent(self, name=check.name, repro=repro, check=check)


class RegressionFailure(Exception):
    """A regression reproducer did not replay as its ``# expect:`` line says."""


class RegressionItem(pytest.Item):
    def __init__(self, *, repro, check, **kwargs):
        super().__init__(**kwargs)
        self.repro, self.check = repro, check

    def runtest(self):
        failure = check_regression(self.repro, self.check)
        if failure is not None:
            raise RegressionFailure(failure)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, RegressionFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}[{self.check.name}]"
