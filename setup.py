"""Builds supervisor/_cgspawn (the helper that starts a service's process
straight into its cgroup, supervisor/_cgspawn.c) next to the package's
modules, when a C compiler is there; without it the supervisor moves each
new process into its cgroup instead (slower, just as safe).  The rest of
the build is pyproject.toml's."""

from __future__ import annotations

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


def compile_helper(source: str, target: str) -> bool:
    """Compile the helper; False (and a line why) when it cannot be."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        print("supervisor: no C compiler: _cgspawn not built (processes are moved into cgroups)")
        return False
    done = subprocess.run([cc, "-O2", "-Wall", "-o", target, source], check=False)
    return done.returncode == 0


class BuildWithHelper(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            compile_helper(os.path.join("supervisor", "_cgspawn.c"),
                           os.path.join(self.build_lib, "supervisor", "_cgspawn"))


setup(cmdclass={"build_py": BuildWithHelper})
