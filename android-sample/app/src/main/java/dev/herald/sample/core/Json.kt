// Plain Kotlin (no Android classes): the two bits of JSON the sample needs, without a
// JSON library (org.json is Android-only; the sample keeps its core testable on a JVM).
package dev.herald.sample.core

/** `{"k":"v",...}` for a string map, e.g. FCM `RemoteMessage.data` for `handlePush`. */
fun jsonObjectOf(map: Map<String, String>): String =
    map.entries.joinToString(",", "{", "}") { (k, v) -> jsonString(k) + ":" + jsonString(v) }

fun jsonString(s: String): String {
    val out = StringBuilder(s.length + 2).append('"')
    for (c in s) {
        when {
            c == '"' -> out.append("\\\"")
            c == '\\' -> out.append("\\\\")
            c == '\n' -> out.append("\\n")
            c == '\r' -> out.append("\\r")
            c == '\t' -> out.append("\\t")
            c < ' ' -> out.append("\\u%04x".format(c.code))
            else -> out.append(c)
        }
    }
    return out.append('"').toString()
}

/**
 * The unescaped string value of the first `"name": "..."` pair in the text; null if
 * there is none. Enough for `{"text": ...}` message data and the `{"token": ...}` answer
 * of the sample backend; use a real JSON library for anything richer.
 */
fun stringField(json: String, name: String): String? {
    val m = Regex("\"" + Regex.escape(name) + "\"\\s*:\\s*\"((?:[^\"\\\\]|\\\\.)*)\"").find(json) ?: return null
    val raw = m.groupValues[1]
    val out = StringBuilder(raw.length)
    var i = 0
    while (i < raw.length) {
        val c = raw[i++]
        if (c != '\\') {
            out.append(c)
            continue
        }
        when (val e = raw[i++]) {
            'n' -> out.append('\n')
            'r' -> out.append('\r')
            't' -> out.append('\t')
            'b' -> out.append('\b')
            'f' -> out.append('\u000c')
            'u' -> { out.append(raw.substring(i, i + 4).toInt(16).toChar()); i += 4 }
            else -> out.append(e) // \" \\ \/
        }
    }
    return out.toString()
}
