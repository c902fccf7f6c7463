"""doit running the pipeline in d-pull's process: failures as one line each, and doit loaded only by the runner."""

import subprocess
import sys

from doit.exceptions import TaskError, TaskFailed, UnmetDependency
from doit.task import Task

from dutils.runner import Reporter


def test_each_failure_is_one_line_and_a_bug_says_where_it_happened():
    reporter, task = Reporter(debug=False), Task("dutils-apply:app", None)
    reporter.add_failure(task, TaskFailed("apply sha256:1234: etc/passwd: Permission denied"))
    reporter.add_failure(task, UnmetDependency("dutils-apply:app"))  # follows from the failure already kept
    try:
        {}["missing"]
    except KeyError as err:
        reporter.add_failure(task, TaskError("a bug", err))
    assert reporter.failures == [
        "apply sha256:1234: etc/passwd: Permission denied",
        "internal error in task dutils-apply:app: KeyError: 'missing' (run with --debug for details)",
    ]


def test_the_pipeline_loads_neither_doit_nor_requests_until_it_runs():
    code = "import sys, dutils.pipeline; print(sorted({'doit', 'requests'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
