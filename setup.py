"""Only here to install ``llmtop-autostart.pth`` into site-packages (everything else is in
pyproject.toml): it makes ``LLMTOP=1 python train.py`` start the agent with no code change."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).resolve().parent / "agent" / "runtime" / "bootstrap" / "llmtop-autostart.pth"


class BuildPyWithPth(build_py):
    """Regular wheels: the .pth goes to the root of the wheel, i.e. site-packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


class EditableWheelWithPth(editable_wheel):
    """Editable installs (`pip install -e .`): add the .pth beside setuptools' own."""

    def _select_strategy(self, *args, **kwargs):  # noqa: ANN002, ANN003 - setuptools' private hook
        strategy = super()._select_strategy(*args, **kwargs)

        class WithPth:
            def __enter__(self):  # noqa: ANN204
                return strategy.__enter__()

            def __exit__(self, *exc):  # noqa: ANN002, ANN204
                return strategy.__exit__(*exc)

            def __call__(self, wheel, files, mapping) -> None:  # noqa: ANN001
                strategy(wheel, files, mapping)
                wheel.writestr(PTH.name, PTH.read_bytes())

        return WithPth()


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
