import ast
import platform as stdlib_platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_a_source_root_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert stdlib_platform.system()  # the standard library module, not our folder
    assert Path(stdlib_platform.__file__).name == "platform.py"


def _imports(package: Path) -> set[str]:
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_dependencies_point_one_way():
    assert not {"django", "gatehouse", "releases", "rest_framework"} & _imports(ROOT / "training")
    assert "releases" not in _imports(ROOT / "platform" / "gatehouse")
    assert "torch" not in _imports(ROOT / "platform" / "gatehouse") | _imports(ROOT / "releases")


def test_every_environment_variable_the_settings_read_is_documented():
    import re

    settings_text = (ROOT / "platform" / "gatehouse" / "settings.py").read_text()
    read = set(re.findall(r'(?:environ(?:\.get)?\(|environ\[|env(?:bool|list|float|int)\()"([A-Z][A-Z0-9_]+)"',
                          settings_text))
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (ROOT / "infra" / "ENVIRONMENT.md").read_text()))
    assert read, "the pattern no longer finds the settings' variables"
    assert sorted(read - documented) == []
