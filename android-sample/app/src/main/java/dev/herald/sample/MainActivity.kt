package dev.herald.sample

import android.Manifest
import android.os.Build
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.result.contract.ActivityResultContracts
import androidx.compose.material3.MaterialTheme

class MainActivity : ComponentActivity() {
    private val askNotifications = registerForActivityResult(ActivityResultContracts.RequestPermission()) {}

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.TIRAMISU) {
            askNotifications.launch(Manifest.permission.POST_NOTIFICATIONS)
        }
        val app = application as SampleApplication
        setContent {
            MaterialTheme {
                val user = app.signedInUser.value
                if (user == null) {
                    SignInScreen(
                        defaults = app.settings.signIn ?: SignIn(
                            BuildConfig.DEFAULT_GATEWAY_URL, BuildConfig.DEFAULT_BACKEND_URL, "alice",
                        ),
                        onSignIn = app::signIn,
                    )
                } else {
                    InboxScreen(
                        user = user,
                        deviceId = app.settings.deviceId,
                        state = app.inbox.value,
                        onRefresh = { app.controller?.refresh() },
                        onSignOut = app::signOut,
                    )
                }
            }
        }
    }
}
