"""Run configs (`python launch/train.py --config=configs/<name>.py`); `common` holds the pieces they share."""
