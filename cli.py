"""Entry point: `python cli.py fit --config configs/ft.yaml`, `python cli.py test --config ...`."""
from editing.cli import main

if __name__ == "__main__":
    main()
