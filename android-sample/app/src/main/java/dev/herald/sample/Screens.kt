package dev.herald.sample

import androidx.compose.foundation.background
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.foundation.shape.RoundedCornerShape
import androidx.compose.material3.Button
import androidx.compose.material3.HorizontalDivider
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.Color
import androidx.compose.ui.unit.dp
import dev.herald.sample.core.Badge
import dev.herald.sample.core.InboxState
import dev.herald.sample.core.ReceivedMessage
import dev.herald.sample.core.Route

/** Stub sign-in: a real app signs the user in to its own backend instead. */
@Composable
fun SignInScreen(defaults: SignIn, onSignIn: (SignIn) -> Unit) {
    var gateway by remember { mutableStateOf(defaults.gatewayUrl) }
    var backend by remember { mutableStateOf(defaults.backendUrl) }
    var user by remember { mutableStateOf(defaults.user) }
    Column(Modifier.fillMaxSize().padding(24.dp), verticalArrangement = Arrangement.spacedBy(12.dp)) {
        Text("Herald sample", style = MaterialTheme.typography.headlineMedium)
        OutlinedTextField(gateway, { gateway = it }, label = { Text("Gateway URL") }, modifier = Modifier.fillMaxWidth())
        OutlinedTextField(backend, { backend = it }, label = { Text("Sample backend URL") }, modifier = Modifier.fillMaxWidth())
        OutlinedTextField(user, { user = it }, label = { Text("User") }, modifier = Modifier.fillMaxWidth())
        Button(
            onClick = { onSignIn(SignIn(gateway.trim(), backend.trim(), user.trim())) },
            enabled = user.isNotBlank() && gateway.isNotBlank() && backend.isNotBlank(),
        ) { Text("Sign in") }
    }
}

@Composable
fun InboxScreen(user: String, deviceId: String, state: InboxState, onRefresh: () -> Unit, onSignOut: () -> Unit) {
    Column(Modifier.fillMaxSize().padding(16.dp)) {
        Row(verticalAlignment = Alignment.CenterVertically) {
            Text(user, style = MaterialTheme.typography.titleLarge, modifier = Modifier.weight(1f))
            ConnectionBadge(state.badge)
        }
        Text("Device $deviceId", style = MaterialTheme.typography.bodySmall)
        state.pushRegistration?.let { Text(it, style = MaterialTheme.typography.bodySmall) }
        state.lastError?.let { Text(it, color = MaterialTheme.colorScheme.error, style = MaterialTheme.typography.bodySmall) }
        Row {
            TextButton(onClick = onRefresh) { Text("Sync now") }
            TextButton(onClick = onSignOut) { Text("Sign out") }
        }
        HorizontalDivider()
        if (state.messages.isEmpty()) {
            Spacer(Modifier.padding(8.dp))
            Text("No messages yet. Send one with curl (see README).")
        }
        LazyColumn(Modifier.fillMaxSize()) {
            items(state.messages, key = { it.id }) { MessageRow(it) }
        }
    }
}

@Composable
fun ConnectionBadge(badge: Badge) {
    val color = when (badge.tone) {
        Badge.Tone.GOOD -> Color(0xFF2E7D32)
        Badge.Tone.BUSY -> Color(0xFFF9A825)
        Badge.Tone.IDLE -> Color(0xFF757575)
        Badge.Tone.BAD -> Color(0xFFC62828)
    }
    Text(
        badge.label,
        color = Color.White,
        style = MaterialTheme.typography.labelMedium,
        modifier = Modifier.background(color, RoundedCornerShape(12.dp)).padding(horizontal = 10.dp, vertical = 4.dp),
    )
}

@Composable
fun MessageRow(message: ReceivedMessage) {
    Column(Modifier.fillMaxWidth().padding(vertical = 8.dp)) {
        Text(message.title, style = MaterialTheme.typography.titleMedium)
        if (message.body.isNotEmpty()) Text(message.body, style = MaterialTheme.typography.bodyMedium)
        val via = if (message.route == Route.PUSH) "push" else "live"
        Text("#${message.seq} · $via · ${message.sentAt}", style = MaterialTheme.typography.bodySmall)
    }
    HorizontalDivider()
}
