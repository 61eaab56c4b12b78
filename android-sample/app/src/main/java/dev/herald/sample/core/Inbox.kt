// Plain Kotlin (no Android classes): compiled and tested on the JVM by
// scripts/test.d/samples.sh against the generated binding and a real gateway.
package dev.herald.sample.core

import dev.herald.sdk.ConnectionState
import dev.herald.sdk.HeraldMessage

/** How a message reached the app: the live connection (listener) or a push (handlePush). */
enum class Route { LIVE, PUSH }

/** One row of the message list. */
data class ReceivedMessage(
    val seq: Long,
    val id: String,
    val title: String,
    val body: String,
    val dataJson: String,
    val sentAt: String,
    val route: Route,
)

/** The connection badge: a short label and a colour class the UI maps to a colour. */
data class Badge(val label: String, val tone: Tone) {
    enum class Tone { GOOD, BUSY, IDLE, BAD }
}

fun badgeOf(state: ConnectionState): Badge = when (state) {
    is ConnectionState.Connected -> Badge("Connected", Badge.Tone.GOOD)
    is ConnectionState.Connecting -> Badge("Connecting…", Badge.Tone.BUSY)
    is ConnectionState.WaitingToReconnect -> Badge("Retrying in ${(state.delayMs.toLong() + 999) / 1000} s", Badge.Tone.BUSY)
    is ConnectionState.Suspended -> Badge("Suspended", Badge.Tone.IDLE)
    is ConnectionState.Disconnected -> Badge("Disconnected", Badge.Tone.IDLE)
    is ConnectionState.Closed -> Badge("Closed", Badge.Tone.BAD)
}

/** Everything the screen shows; immutable, replaced on every change. */
data class InboxState(
    val badge: Badge = badgeOf(ConnectionState.Disconnected),
    val messages: List<ReceivedMessage> = emptyList(),
    val lastError: String? = null,
    val pushRegistration: String? = null,
)

/**
 * The message list: newest first, each message id once. The SDK already delivers each
 * message once through exactly one path (listener or handlePush); the id check keeps the
 * list right when the same message is also shown from a notification tap or a restored
 * list, and costs nothing.
 */
class Inbox(private val capacity: Int = 200) {
    private val byId = LinkedHashMap<String, ReceivedMessage>()

    /** Adds the messages not seen before; returns those (in the order given). */
    fun add(messages: List<ReceivedMessage>): List<ReceivedMessage> {
        val added = messages.filter { byId.putIfAbsent(it.id, it) == null }
        while (byId.size > capacity) byId.remove(byId.keys.first())
        return added
    }

    fun newestFirst(): List<ReceivedMessage> = byId.values.sortedByDescending { it.seq }
}

/** The row for a message: the notification text if it has one, else its data. */
fun HeraldMessage.toReceived(route: Route): ReceivedMessage {
    val text = stringField(dataJson, "text")
    return ReceivedMessage(
        seq = seq,
        id = id,
        title = notification?.title ?: text ?: "Message $seq",
        body = notification?.body ?: if (text != null) "" else dataJson,
        dataJson = dataJson,
        sentAt = sentAt,
        route = route,
    )
}
