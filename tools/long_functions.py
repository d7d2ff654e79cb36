"""List library functions longer than a limit (default 60 lines): python tools/long_functions.py [limit]."""
import ast
import pathlib
import sys


def long_functions(root: str = "sparge_compile", limit: int = 60):
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    yield f"{path}:{node.lineno} {node.name} {n} lines"


if __name__ == "__main__":
    found = list(long_functions(limit=int(sys.argv[1]) if len(sys.argv) > 1 else 60))
    print("\n".join(found) or "no library function over the limit")
    sys.exit(1 if found else 0)
