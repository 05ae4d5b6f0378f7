"""The layout rule: library files import no script, lazily or not, and hold no run keys."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ['parallel', 'model', 'pipeline', 'checkpoint', 'configurator', 'decode', 'corpus']
SCRIPTS = ['train', 'generate', 'tune', 'evaluate', 'bench', 'convert']


def imported(path):
    """Every module name an import statement in the file names, at any depth (functions too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split('.')[0])
        elif isinstance(node, ast.Call) and getattr(node.func, 'id', getattr(node.func, 'attr', None)) in (
                '__import__', 'import_module') and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split('.')[0])
    return names


@pytest.mark.parametrize('lib', LIBRARIES)
def test_libraries_import_no_script(lib):
    bad = imported(os.path.join(ROOT, f'{lib}.py')) & set(SCRIPTS)
    assert not bad, f'{lib}.py imports the script(s) {sorted(bad)}; move what it needs into a library'


def test_the_check_sees_lazy_imports(tmp_path):
    f = tmp_path / 'x.py'
    f.write_text('def f():\n    from train import configure\n    import generate as g\n    __import__("tune")\n')
    assert imported(str(f)) >= {'train', 'generate', 'tune'}


@pytest.mark.parametrize('lib', LIBRARIES)
def test_libraries_hold_no_run_configuration(lib):
    """Module-level names in a library are functions, classes, constants in CAPITALS, or imports."""
    tree = ast.parse(open(os.path.join(ROOT, f'{lib}.py')).read())
    keys = [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name) and not t.id.isupper() and not t.id.startswith('_')]
    allowed = {'Exit', 'Micro', 'Action'}  # namedtuple types
    assert set(keys) <= allowed, f'{lib}.py has module-level variables {sorted(set(keys) - allowed)}'
