"""Browser app (``conceptexpress ui``, optional extra ``[ui]``): upload → concepts → edit → train → generate → zip.

``session`` holds the app's logic without gradio (tested without a browser); ``app`` lays it out with gradio;
``cli`` is the subcommand. Importing this package does not import gradio.
"""
