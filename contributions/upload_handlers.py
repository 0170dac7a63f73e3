"""Refuse an oversized upload while it streams in, before it is read whole.

Django's FILE_UPLOAD_MAX_MEMORY_SIZE only decides when an upload spills to a temporary
file; nothing in Django caps an upload's size. This handler sits first in
FILE_UPLOAD_HANDLERS: a declared Content-Length over the cap stops parsing before a byte
of the body is read, and a body without one (chunked) is cut off as soon as the files
in it pass the cap. Either way ``request.upload_too_large`` tells the view.
"""

from __future__ import annotations

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import QueryDict
from django.utils.datastructures import MultiValueDict

# Multipart framing and the form's text fields on top of the files themselves.
MULTIPART_OVERHEAD_BYTES = 256 * 1024


def upload_limit_bytes() -> int:
    return settings.TESSERA_MAX_UPLOAD_BYTES


class SizeCappedUploadHandler(FileUploadHandler):
    def __init__(self, request=None) -> None:
        super().__init__(request)
        self.received = 0
        if request is not None:
            request.upload_too_large = False

    def _refuse(self) -> None:
        if self.request is not None:
            self.request.upload_too_large = True

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > upload_limit_bytes() + MULTIPART_OVERHEAD_BYTES:
            self._refuse()
            # Returning a result here ends parsing: the body is never read.
            return QueryDict(encoding=encoding), MultiValueDict()
        return None

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > upload_limit_bytes():
            self._refuse()
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size):
        return None
