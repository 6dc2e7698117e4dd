from batch.cli import entry

entry()
