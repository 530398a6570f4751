"""End-to-end speech translation: tasks (speech.data), filterbanks (speech.features), the Speech2Text model
(speech.models), the kNN datastore (speech.datastore), and the DNKD method package (speech.dnkd)."""
