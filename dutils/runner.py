"""doit running the pipeline in d-pull's process (apart from pipeline.py: deciding a no-op loads no doit)."""

import sys

from doit.cmd_base import ModuleTaskLoader
from doit.dependency import JsonDB
from doit.doit_cmd import DoitMain
from doit.exceptions import TaskFailed, UnmetDependency
from doit.reporter import ZeroReporter

from .pipeline import Pull, finish, pull_tasks


class Reporter(ZeroReporter):
    """A doit reporter that prints nothing (Progress speaks to the user) and keeps each failure as one line."""

    def __init__(self, debug: bool) -> None:
        super().__init__(sys.stderr, {})
        self.debug = debug

    def add_failure(self, task, fail) -> None:
        if isinstance(fail, UnmetDependency):
            return  # a consequence of a failure that is reported already
        if isinstance(fail, TaskFailed) or self.debug:
            self.failures.append(fail.get_msg().strip() if self.debug else fail.message)
        else:  # an exception escaped an action: a bug, shown briefly unless --debug
            last = "".join(fail.traceback).strip().splitlines()[-1:] or [fail.message]
            self.failures.append(f"internal error in task {task.name}: {last[0]} (run with --debug for details)")

    def runtime_error(self, message: str) -> None:
        self.failures.append(message)

    def cleanup_error(self, fail) -> None:
        self.failures.append(fail.get_msg())


class MemoryDB(JsonDB):
    """doit's database, kept in memory: every up-to-date check here rests on facts on disk, so there is
    nothing worth saving, and no half-written database after a full disk or a kill."""

    def __init__(self, name: str, codec: object, *, module_name: str | None = None) -> None:
        self.name, self.codec, self._db = name, codec, {}

    def dump(self) -> None:
        pass


def run_pulls(pulls: list[Pull], debug: bool) -> list[str]:
    """Run the pipeline in this process; return the failures, one line each (none means every pull finished)."""
    reporter = Reporter(debug)
    config = {
        "dep_file": "unused",
        "backend": "memory",
        "reporter": reporter,
        "verbosity": 0,
        "num_process": max(pull.options.jobs for pull in pulls) + 1,  # and one applying layers meanwhile
        "par_type": "thread",  # delayed tasks hold closures, which the process runner cannot pickle
        "default_tasks": ["dutils"],
    }
    namespace = {**pull_tasks(pulls), "DOIT_CONFIG": config}
    try:
        plugins = {"BACKEND": {"memory": f"{__name__}:MemoryDB"}}
        # config_filenames=(): a doit.cfg or pyproject.toml in the current folder must not change a pull
        code = DoitMain(ModuleTaskLoader(namespace), config_filenames=(), extra_config=plugins).run(["run"])
    finally:
        finish(pulls)
    if code and not reporter.failures:
        reporter.failures.append(f"the pull stopped with doit status {code} (run with --debug for details)")
    return reporter.failures
