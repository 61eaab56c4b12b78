// JVM tests of the sample's plain-Kotlin core (app/src/main/java/dev/herald/sample/core)
// against a real gateway and the real sample backend (token-server.py), both started by
// scripts/test.d/samples.sh. A plain `main`: prints one line per test and
// "N passed, M failed", exits non-zero on any failure (helpers in
// bindings/kotlin-tests/src/TestKit.kt). Environment: HERALD_URL, HERALD_API_KEY,
// SAMPLE_BACKEND_URL, HERALD_TEST_DIR.

import dev.herald.sample.core.*
import dev.herald.sdk.ClientConfig
import dev.herald.sdk.HeraldException
import dev.herald.sdk.PushProvider
import java.io.File
import java.util.concurrent.CopyOnWriteArrayList

val gatewayUrl: String = System.getenv("HERALD_URL") ?: error("HERALD_URL not set")
val apiKey: String = System.getenv("HERALD_API_KEY") ?: error("HERALD_API_KEY not set")
val backendUrl: String = System.getenv("SAMPLE_BACKEND_URL") ?: error("SAMPLE_BACKEND_URL not set")
val testDir = File(System.getenv("HERALD_TEST_DIR") ?: error("HERALD_TEST_DIR not set"))

/** Publishes [json] with DEVICE replaced by [device]; returns the message id. */
fun publish(device: String, json: String): String {
    val (code, body) = httpRequest("POST", "$gatewayUrl/v1/messages", json.replace("DEVICE", device), apiKey)
    check(code == 202) { "publish answered $code: $body" }
    return stringField(body, "message_id") ?: throw CheckFailed("no message_id in $body")
}

fun lastSeq(device: String): Long {
    val (code, body) = httpRequest("GET", "$gatewayUrl/v1/devices/$device", null, apiKey)
    check(code == 200) { "device answered $code: $body" }
    return Regex("\"last_seq\"\\s*:\\s*(\\d+)").find(body)!!.groupValues[1].toLong()
}

class Ui {
    val states = CopyOnWriteArrayList<InboxState>()
    fun last(): InboxState = states.lastOrNull() ?: InboxState()
    fun labels(): List<String> = states.map { it.badge.label }.distinct()
}

fun controller(device: String, ui: Ui, user: String = "alice") = HeraldController(
    ClientConfig(
        baseUrl = gatewayUrl,
        deviceId = device,
        dataDir = File(testDir, device).path,
        backoffMinMs = 50uL,
        backoffMaxMs = 500uL,
    ),
    SampleBackendTokenProvider(backendUrl, user),
) { ui.states.add(it) }

fun main() {
    test("JSON helpers round-trip quotes, backslashes, control and non-ASCII characters") {
        val tricky = "a \"quoted\" \\path\\ line\nnext\ttab \u0001 é ☃"
        val json = jsonObjectOf(mapOf("text" to tricky, "next" to "v\\"))
        check(stringField(json, "text") == tricky) { "got ${stringField(json, "text")} from $json" }
        // The escaped quotes and backslashes of the first value do not end it early.
        check(stringField(json, "next") == "v\\") { "next in $json" }
        check(stringField(json, "absent") == null) { "absent field" }
    }

    test("inbox keeps each id once, newest first, bounded") {
        val inbox = Inbox(capacity = 3)
        fun m(seq: Long) = ReceivedMessage(seq, "id$seq", "t", "b", "{}", "", Route.LIVE)
        check(inbox.add(listOf(m(1), m(2))).size == 2) { "first add" }
        check(inbox.add(listOf(m(2), m(3))).map { it.id } == listOf("id3")) { "duplicate added" }
        inbox.add(listOf(m(4)))
        check(inbox.newestFirst().map { it.seq } == listOf(4L, 3L, 2L)) { "got ${inbox.newestFirst()}" }
    }

    test("sample backend: mints tokens for a user, refuses a request without one") {
        val (bad, badBody) = httpRequest("POST", "$backendUrl/device-token", "{}", null)
        check(bad == 400) { "no user answered $bad: $badBody" }
        val token = SampleBackendTokenProvider(backendUrl, "alice").fetchToken("and-token")
        check(token.count { it == '.' } == 2) { "not a JWT: $token" }
        try {
            SampleBackendTokenProvider("http://127.0.0.1:1", "alice").fetchToken("and-token")
            throw CheckFailed("no exception for an unreachable backend")
        } catch (e: HeraldException.TokenProvider) {
            check(e.detail.contains("unreachable")) { e.detail }
        }
    }

    test("connect: badge goes Connecting -> Connected; live messages listed newest first") {
        val ui = Ui()
        val c = controller("and-live", ui)
        c.start()
        waitFor("Connected badge") { ui.last().badge.label == "Connected" }
        check(ui.labels().take(2) == listOf("Connecting…", "Connected")) { "badges ${ui.labels()}" }
        publish("and-live", """{"to":{"device":"DEVICE"},"data":{"text":"hello"},"push":"never"}""")
        publish("and-live", """{"to":{"device":"DEVICE"},"data":{"n":2},"notification":{"title":"Order","body":"shipped"},"push":"never"}""")
        waitFor("two messages") { ui.last().messages.size == 2 }
        val rows = ui.last().messages
        check(rows.map { it.seq } == listOf(2L, 1L)) { "order ${rows.map { it.seq }}" }
        check(rows[1].title == "hello" && rows[1].route == Route.LIVE) { "row ${rows[1]}" }
        check(rows[0].title == "Order" && rows[0].body == "shipped") { "row ${rows[0]}" }
        c.close()
        check(ui.last().badge.label == "Closed") { "after close ${ui.last().badge}" }
    }

    test("lifecycle and network: background/offline suspend, foreground/online reconnect and catch up") {
        val ui = Ui()
        val c = controller("and-life", ui)
        c.start()
        waitFor("Connected") { ui.last().badge.label == "Connected" }
        c.background()
        waitFor("Suspended after background") { ui.last().badge.label == "Suspended" }
        publish("and-life", """{"to":{"device":"DEVICE"},"data":{"text":"while in background"},"push":"never"}""")
        Thread.sleep(300)
        check(ui.last().messages.isEmpty()) { "delivered while suspended" }
        c.foreground()
        waitFor("caught up after foreground") { ui.last().messages.size == 1 && ui.last().badge.label == "Connected" }
        c.networkChanged(false)
        waitFor("Suspended when offline") { ui.last().badge.label == "Suspended" }
        c.networkChanged(true)
        waitFor("Connected when online") { ui.last().badge.label == "Connected" }
        c.close()
    }

    test("push: token registered; FCM data handled once, not repeated by the live connection") {
        val ui = Ui()
        val c = controller("and-push", ui)
        val reg = c.registerPushToken(PushProvider.FCM, "fcm-sample-token")
        check(reg.pushTokenState == "active" && reg.deviceId == "and-push") { "$reg" }
        check(ui.last().pushRegistration == "fcm token active") { "${ui.last()}" }
        val id = publish("and-push", """{"to":{"device":"DEVICE"},"data":{"text":"say \"hi\""},"push":"never"}""")
        // The FCM data map the gateway sends for a full push (docs/push.md).
        val data = mapOf(
            "herald_id" to id,
            "herald_seq" to lastSeq("and-push").toString(),
            "herald_device" to "and-push",
            "herald_data" to """{"text":"say \"hi\""}""",
        )
        val shown = c.handlePush(data)
        check(shown.size == 1 && shown[0].id == id && shown[0].route == Route.PUSH) { "shown $shown" }
        check(shown[0].title == "say \"hi\"") { "title ${shown[0].title}" }
        check(c.handlePush(data).isEmpty()) { "duplicate push shown again" }
        check(c.handlePush(mapOf("from" to "another sdk")).isEmpty()) { "foreign push shown" }
        c.start()
        waitFor("Connected") { ui.last().badge.label == "Connected" }
        publish("and-push", """{"to":{"device":"DEVICE"},"data":{"text":"live"},"push":"never"}""")
        waitFor("live message") { ui.last().messages.size == 2 }
        Thread.sleep(300)
        check(ui.last().messages.map { it.route } == listOf(Route.LIVE, Route.PUSH)) { "${ui.last().messages}" }
        c.close()
    }

    test("a device of another user: the terminal error reaches the screen") {
        val owner = Ui()
        val a = controller("and-owned", owner, user = "alice")
        a.start()
        waitFor("owner connected") { owner.last().badge.label == "Connected" }
        a.close()
        val ui = Ui()
        val b = HeraldController(
            ClientConfig(baseUrl = gatewayUrl, deviceId = "and-owned", dataDir = File(testDir, "and-owned-b").path),
            SampleBackendTokenProvider(backendUrl, "mallory"),
        ) { ui.states.add(it) }
        b.start()
        waitFor("error shown") { ui.last().lastError != null }
        check(ui.last().lastError!!.contains("forbidden") && ui.last().lastError!!.contains("stopped")) { "${ui.last().lastError}" }
        check(ui.last().badge.label == "Disconnected") { "${ui.last().badge}" }
        b.close()
    }

    finish()
}
