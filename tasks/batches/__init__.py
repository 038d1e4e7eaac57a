"""Files and batches (OpenAI's Files and Batches APIs): their records, storage and contract.

Plain data and storage only (Redis, the files directory): the API's routes and its batch
dispatcher (api/files.py, api/batches.py, api/batch_dispatcher.py) build on them.
"""
