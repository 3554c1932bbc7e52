"""Bundled data, so the stability report trains on real text without a download.

``python_reference.txt`` (466 KB, UTF-8) is the Python 3.11 Language Reference
topic text that ships with every CPython installation as ``pydoc_data.topics``
(what ``help('if')`` prints), © Python Software Foundation, distributed under
the PSF licence. It was written with::

    from pydoc_data.topics import topics
    text = "\\n".join(topics[k].strip() + "\\n" for k in sorted(topics))

and is committed rather than regenerated so every machine trains on the same bytes.
"""
