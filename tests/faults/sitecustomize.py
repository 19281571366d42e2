"""Started with this folder on PYTHONPATH (tests/helpers.py puts it there when a test asks for a fault), a fresh
interpreter patches snnet.train.resume with the test's faults once that module is imported (inject.py), not
before: train.py installs its signal handlers before torch loads."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inject  # noqa: E402

if inject.asked():
    class _PatchOnImport:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name != "snnet.train.resume":
                return None
            sys.meta_path.remove(cls)
            import importlib.util
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                inject.patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport)
