"""Request body parsers. DRF's JSONParser lets a deeply nested document raise RecursionError (a 500); this one
answers 400. (Bodies over DATA_UPLOAD_MAX_MEMORY_SIZE never reach a parser: see gatehouse.core.api.)"""
from rest_framework import exceptions, parsers


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - the body is nested too deeply; flatten it.") from None
