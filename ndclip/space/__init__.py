"""A Hugging Face Space for a trained NdCLIP: the Gradio app (`app.py`), the command that writes and pushes a
self-contained Space folder (`builder.py`, `ndclip space`), and the browser driver that tests the running app and
takes the README's screenshot (`browser.py`)."""
