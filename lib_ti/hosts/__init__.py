"""Host adapters: the only part of lib_ti that touches a webui's ``modules``, always imported lazily."""
