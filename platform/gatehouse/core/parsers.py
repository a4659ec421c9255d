"""Request body parsers. DRF's JSONParser lets a deeply nested document raise RecursionError (a 500), and lets a
NUL character through to fields PostgreSQL cannot store it in (JSON ones: DRF's CharField refuses it, JSONField
does not), and an unpaired surrogate ("\\ud800") no database can encode; this one answers 400 to all three.
(Bodies over DATA_UPLOAD_MAX_MEMORY_SIZE never reach a parser: see gatehouse.core.api.)"""
from rest_framework import exceptions, parsers

from gatehouse.core.badinput import JSON_MESSAGE, contains_unstorable_text


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - the body is nested too deeply; flatten it.") from None
        if contains_unstorable_text(data):
            raise exceptions.ParseError(JSON_MESSAGE)
        return data
