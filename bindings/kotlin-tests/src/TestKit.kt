// The few helpers the JVM test programs share (bindings/kotlin-tests/src/Main.kt and
// android-sample/core-tests/CoreTest.kt): a plain `main` runs `test { }` blocks, prints
// one line per test and "N passed, M failed" (see finish()).

import java.net.HttpURLConnection
import java.net.URI

var passed = 0
var failed = 0

class CheckFailed(message: String) : Exception(message)

fun check(cond: Boolean, what: () -> String) {
    if (!cond) throw CheckFailed(what())
}

fun test(name: String, body: () -> Unit) {
    val started = System.currentTimeMillis()
    try {
        body()
        passed++
        println("ok   $name (${System.currentTimeMillis() - started} ms)")
    } catch (e: Throwable) {
        failed++
        println("FAIL $name: $e")
    }
}

/** Polls until [cond] holds, at most [timeoutMs]. */
fun waitFor(what: String, timeoutMs: Long = 15_000, cond: () -> Boolean) {
    val deadline = System.currentTimeMillis() + timeoutMs
    while (!cond()) {
        if (System.currentTimeMillis() > deadline) throw CheckFailed("timed out waiting for $what")
        Thread.sleep(20)
    }
}

/** One HTTP request; returns the status and the body (of an error answer too). */
fun httpRequest(method: String, url: String, body: String?, bearer: String?): Pair<Int, String> {
    val c = URI(url).toURL().openConnection() as HttpURLConnection
    c.requestMethod = method
    c.connectTimeout = 5000
    c.readTimeout = 10000
    if (bearer != null) c.setRequestProperty("Authorization", "Bearer $bearer")
    if (body != null) {
        c.doOutput = true
        c.setRequestProperty("Content-Type", "application/json")
        c.outputStream.use { it.write(body.toByteArray()) }
    }
    val code = c.responseCode
    val stream = if (code < 400) c.inputStream else c.errorStream
    return code to (stream?.bufferedReader()?.use { it.readText() } ?: "")
}

/** Prints the summary and exits non-zero on any failure. */
fun finish(): Nothing {
    println("$passed passed, $failed failed")
    kotlin.system.exitProcess(if (failed == 0) 0 else 1)
}
