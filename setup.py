"""Packaging: the metadata is in setup.cfg.  An installed copy carries the
child entrypoint as _concurrency_worker.py, not worker.py: a top-level
module named ``worker`` would answer every ``import worker`` on the machine
(and the package index has another project of that name).  concurrency.py
finds it by either name, beside itself; a checkout keeps worker.py."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        self.copy_file(os.path.join(here, "worker.py"),
                       os.path.join(self.build_lib, "_concurrency_worker.py"))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, "_concurrency_worker.py")]


setup(cmdclass={"build_py": BuildPy})
